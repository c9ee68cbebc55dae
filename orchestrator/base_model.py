"""The base model: resolve `model.base` to a directory, load it (quantized or not), add the adapter.

Every base, the built-in demo included, goes through the same `from_pretrained` path.
bitsandbytes and peft are imported only inside the functions that need them.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.spec import JobSpec, ModelSpec, Problem, SpecError

# Module-path words that mark a linear layer as attention or MLP. Matching on the path
# (`model.layers.0.self_attn.q_proj`, `transformer.h.0.mlp.c_fc`) works across Llama,
# Mistral, Qwen, GPT-NeoX and Falcon without a per-architecture table.
_ATTENTION_WORDS = ("attn", "attention")
_MLP_WORDS = ("mlp", "feed_forward", "ffn")


def resolve_base(model: ModelSpec, progress=None) -> str:
    """A local directory (built-in models are built and cached on first use) or a hub id.

    `progress(done, total)` is called while a built-in model is being pre-trained."""
    if model.base.startswith("builtin:"):
        from orchestrator.builtin_models import resolve_builtin

        return str(resolve_builtin(model.base, progress=progress))
    return model.base


def check_base_files(path: str) -> None:
    """Raise `SpecError` when a local base directory lacks weights or a tokenizer (a config.json
    alone is enough to plan memory, not to train)."""
    folder = Path(path)
    if not folder.is_dir():
        return  # a hub id: the hub says what is missing
    missing = []
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        missing.append("weight files (*.safetensors or *.bin)")
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        missing.append("tokenizer files (tokenizer.json, tokenizer.model or tokenizer_config.json)")
    if missing:
        raise SpecError([Problem(path="model.base", message=f"the model directory {folder} has no "
                                                            f"{' and no '.join(missing)}",
                                 fix="copy the whole saved model (save_pretrained writes the weights and "
                                     "tokenizer files), or point at a complete one")])


def torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(spec: JobSpec):
    """The `BitsAndBytesConfig` for the spec, or None for an unquantized base."""
    q = spec.quantization
    if q.bits is None:
        return None
    from transformers import BitsAndBytesConfig

    dtype = torch_dtype(spec.model.dtype)
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    # ZeRO-3 partitions every parameter it is given, and can only shard the packed 4-bit
    # weights if they are stored in the model's float dtype rather than uint8.
    storage = dtype if spec.distributed.deepspeed.stage == 3 else None
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=dtype, **({"bnb_4bit_quant_storage": storage} if storage else {}))


def load_base(spec: JobSpec, path: str, device: str = "cpu", quantize: bool = True):
    """The base causal LM, in the spec's dtype and (when asked) quantized as the spec says."""
    from transformers import AutoModelForCausalLM

    qconfig = quantization_config(spec) if quantize else None
    kwargs = {"quantization_config": qconfig, "device_map": {"": device}} if qconfig else {}
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype(spec.model.dtype), revision=spec.model.revision,
        trust_remote_code=spec.model.trust_remote_code, **kwargs)
    if not qconfig:
        model.to(device)
    elif qconfig.load_in_4bit and device == "cpu":
        _keep_4bit_trainable_on_cpu(model)
    elif device == "cpu":
        _keep_8bit_dtype_on_cpu(model)
    return model


def _keep_8bit_dtype_on_cpu(model) -> None:
    """bitsandbytes' (0.50) 8-bit matmul on the CPU returns float32 whatever its input, so the
    hidden states reach the bf16/fp16 lm_head as float32, which it refuses; cast them to the
    head's dtype on the way in (a differentiable cast). The layers in between take either."""
    head = model.get_output_embeddings()
    head.register_forward_pre_hook(lambda module, args: (args[0].to(module.weight.dtype), *args[1:]))


def _keep_4bit_trainable_on_cpu(model) -> None:
    """bitsandbytes (0.50) repacks a 4-bit layer's weights for an inference-only CPU kernel the
    first time it runs in eval mode on an avx512-bf16 CPU, after which no gradient reaches the
    layer's input, so LoRA below it stops learning. Our base evaluation runs before training;
    switching that kernel off keeps every layer trainable (the repacking saves no memory)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def linear_module_names(model) -> dict[str, str]:
    """Full path -> leaf name of every linear layer (plain, 4-bit or 8-bit), lm_head excluded."""
    import torch

    linear_types: tuple = (torch.nn.Linear,)
    try:
        import bitsandbytes as bnb

        linear_types += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:  # pragma: no cover - bitsandbytes is a hard dependency, but planning needs none
        pass
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, linear_types) and not name.endswith("lm_head"):
            out[name] = name.rsplit(".", 1)[-1]
    return out


def resolve_target_modules(target: str | list[str], model) -> list[str]:
    """The live model's leaf names for a preset (`attention`, `mlp`, `all-linear`) or a list."""
    return select_targets(target, linear_module_names(model))


def select_targets(target: str | list[str], linears: dict[str, str]) -> list[str]:
    """Resolve a target preset or list against `linears` (module path -> leaf name); pure, so
    the memory planner resolves presets for an architecture exactly as training does.

    Raises `SpecError` naming the modules there are when nothing (or a wrong name) matches.
    """
    available = sorted(set(linears.values()))
    if isinstance(target, list):
        unknown = [m for m in target if m not in available]
        if unknown:
            raise SpecError([Problem(path="peft.target_modules",
                                     message=f"the model has no linear module named {', '.join(unknown)}",
                                     fix=f"choose from {', '.join(available)}")])
        return list(target)
    if target == "all-linear":
        return available

    chosen = sorted(_leaves_under(_ATTENTION_WORDS if target == "attention" else _MLP_WORDS, linears))
    if not chosen:
        raise SpecError([Problem(path="peft.target_modules",
                                 message=f"preset '{target}' matches no module of this model",
                                 fix=f"list module names instead, from {', '.join(available)}")])
    return chosen


def _leaves_under(words: tuple[str, ...], linears: dict[str, str]) -> set[str]:
    """Leaf names of the linear layers with one of `words` in a parent module's name."""
    return {leaf for path, leaf in linears.items() if any(w in part for part in path.split(".")[:-1] for w in words)}


def lora_config(spec: JobSpec, target_modules: list[str]):
    from peft import LoraConfig

    p = spec.peft
    return LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, use_dora=p.use_dora,
                      use_rslora=p.use_rslora, target_modules=target_modules, bias="none", task_type="CAUSAL_LM")


# Architectures whose attention PEFT's LLaMA-Adapter (adaption_prompt) knows how to extend
# (peft/tuners/adaption_prompt/config.py: TRANSFORMERS_MODEL_CONFIG).
ADAPTION_PROMPT_MODEL_TYPES = ("llama", "mistral")


def architecture_problems(spec: JobSpec, model_type: str, num_layers: int) -> list[Problem]:
    """What the spec asks of the peft method that this architecture cannot give."""
    p = spec.peft
    problems = []
    if p.method == "adaption_prompt" and model_type not in ADAPTION_PROMPT_MODEL_TYPES:
        problems.append(Problem(path="peft.method",
                                message=f"adaption_prompt (LLaMA-Adapter) supports {', '.join(ADAPTION_PROMPT_MODEL_TYPES)} "
                                        f"models, and {spec.model.base} is a {model_type} model",
                                fix="use prefix_tuning or prompt_tuning (additive methods that work on any decoder)"))
    for field in ("adapter_layers", "last_n_layers"):
        value = getattr(p, field)
        if value is not None and value > num_layers:
            problems.append(Problem(path=f"peft.{field}", message=f"{value} is more than the model's {num_layers} layers",
                                    fix=f"use at most {num_layers}"))
    return problems


def ia3_feedforward(targets: list[str], linears: dict[str, str]) -> list[str]:
    """IA3 scales a feed-forward module's input and any other module's output; the feed-forward
    ones are the targets that sit inside the MLP (pure, shared with the planner)."""
    mlp = _leaves_under(_MLP_WORDS, linears)
    return [t for t in targets if t in mlp]


def freeze_selects(name: str, patterns: list[str] | None, last_n: int | None, num_layers: int) -> bool:
    """Whether `freeze` trains the parameter `name`: it matches one of `patterns` (regular
    expressions, searched in the name) or sits in one of the last `last_n` decoder blocks."""
    import re

    if any(re.search(p, name) for p in patterns or ()):
        return True
    block = re.search(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.", name)
    return bool(last_n and block and int(block.group(1)) >= num_layers - last_n)


def peft_config(spec: JobSpec, model, base_path: str):
    """The peft config of an adapter method, resolved against the live model."""
    import peft

    p = spec.peft
    if p.method == "lora":
        return lora_config(spec, resolve_target_modules(p.target_modules, model))
    if p.method == "ia3":
        linears = linear_module_names(model)
        targets = select_targets(p.target_modules, linears)
        return peft.IA3Config(target_modules=targets, feedforward_modules=ia3_feedforward(targets, linears),
                              task_type="CAUSAL_LM")
    if p.method == "prompt_tuning":
        text = {"prompt_tuning_init": peft.PromptTuningInit.TEXT, "prompt_tuning_init_text": p.init_text,
                "tokenizer_name_or_path": base_path} if p.init_text else {}
        return peft.PromptTuningConfig(num_virtual_tokens=p.virtual_tokens, task_type="CAUSAL_LM", **text)
    if p.method == "prefix_tuning":
        return peft.PrefixTuningConfig(num_virtual_tokens=p.virtual_tokens, task_type="CAUSAL_LM")
    if p.method == "adaption_prompt":
        return peft.AdaptionPromptConfig(adapter_len=p.prompt_len, task_type="CAUSAL_LM",
                                         adapter_layers=p.adapter_layers or model.config.num_hidden_layers)
    raise ValueError(f"peft.method {p.method} has no adapter")


def prepare_for_training(spec: JobSpec, model, base_path: str = ""):
    """Make the model trainable as the spec says: wrapped with a peft adapter (only the adapter
    trains); for `freeze`, the selected weights trainable and the rest frozen; for `full`, every
    weight trainable. Raises `SpecError` when the architecture cannot take the method."""
    problems = architecture_problems(spec, model.config.model_type, model.config.num_hidden_layers)
    if problems:
        raise SpecError(problems)
    if spec.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    p = spec.peft
    if p.method in ("full", "freeze"):
        n = model.config.num_hidden_layers
        for name, param in model.named_parameters():
            param.requires_grad_(p.method == "full" or freeze_selects(name, p.trainable_patterns, p.last_n_layers, n))
        return model
    from peft import get_peft_model

    return get_peft_model(model, peft_config(spec, model, base_path))


# A freeze job saves only the tensors it trained, under this name, beside the job spec.
TRAINED_TENSORS = "trained_tensors.safetensors"


def load_trained_model(saved_dir: str | Path, spec: JobSpec, base_path: str, quantize: bool = True):
    """A trained model ready for inference: base + saved adapter, base + the tensors a freeze
    job trained, or the saved full model."""
    method = spec.peft.method
    if method == "full":
        model = load_base(spec, str(saved_dir), quantize=False)
    elif method == "freeze":
        from safetensors.torch import load_file

        model = load_base(spec, base_path, quantize=False)
        trained = load_file(str(Path(saved_dir) / TRAINED_TENSORS))
        missing = set(trained) - {n for n, _ in model.named_parameters()}
        if missing:
            raise ValueError(f"{saved_dir}: trained tensors {sorted(missing)[:3]} are not in the base {base_path}")
        model.load_state_dict(trained, strict=False)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_base(spec, base_path, quantize=quantize), str(saved_dir))
    model.eval()
    return model


def base_weights_dir(model: ModelSpec, base_path: str) -> Path | None:
    """The local directory holding the base's weight files: the path itself, or the hub cache's
    snapshot of a hub id (None when it is not in the cache)."""
    if Path(base_path).is_dir():
        return Path(base_path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base_path, revision=model.revision, local_files_only=True,
                                      allow_patterns=["*.safetensors", "*.bin"]))
    except Exception:  # not cached (or not a hub id): nothing to hash
        return None


def base_sha256(model: ModelSpec, base_path: str) -> str | None:
    """sha256 over the base's weight files (name and bytes, in name order), so an adapter can tell
    at load time that the base it is put on is not the one it was trained on.

    Reads every weight file once (~1-2 GB/s: seconds for a 7B model); None when none is found."""
    import hashlib

    folder = base_weights_dir(model, base_path)
    files = (sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))) if folder else []
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        hash_file(digest, f)
    return digest.hexdigest()


def hash_file(digest, path) -> None:
    """Feed a file's bytes into `digest` in 16 MiB chunks (weights can be many GB)."""
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
