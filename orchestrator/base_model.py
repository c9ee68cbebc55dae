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
    return model


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

    words = _ATTENTION_WORDS if target == "attention" else _MLP_WORDS
    chosen = sorted({leaf for path, leaf in linears.items()
                     if any(w in part for part in path.split(".")[:-1] for w in words)})
    if not chosen:
        raise SpecError([Problem(path="peft.target_modules",
                                 message=f"preset '{target}' matches no module of this model",
                                 fix=f"list module names instead, from {', '.join(available)}")])
    return chosen


def lora_config(spec: JobSpec, target_modules: list[str]):
    from peft import LoraConfig

    p = spec.peft
    return LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout,
                      target_modules=target_modules, bias="none", task_type="CAUSAL_LM")


def prepare_for_training(spec: JobSpec, model):
    """Make the model trainable as the spec says: wrapped with LoRA (only the adapter trains),
    or, for `full`, every weight trainable."""
    if spec.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if spec.peft.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model

    targets = resolve_target_modules(spec.peft.target_modules, model)
    return get_peft_model(model, lora_config(spec, targets))


def load_trained_model(saved_dir: str | Path, spec: JobSpec, base_path: str, quantize: bool = True):
    """A trained model ready for inference: base + saved adapter, or the saved full model."""
    if spec.peft.method == "full":
        model = load_base(spec, str(saved_dir), quantize=False)
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
