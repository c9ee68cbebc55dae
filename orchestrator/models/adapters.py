"""The adapter: make a loaded base trainable as `peft.method` says (a peft adapter, the selected
weights for `freeze`, every weight for `full`) and load a trained one back. The target rules
themselves are `planning.targets`, shared with the memory planner; peft is imported only inside
the functions that need it."""

from __future__ import annotations

from pathlib import Path

from orchestrator.models.loading import load_base_for_inference, load_base_for_training
from orchestrator.planning.targets import (architecture_problems, freeze_selects, fused_expert_problems,
                                           ia3_feedforward, select_targets, split_targets)
from orchestrator.spec import JobSpec, SpecError


def linear_module_names(model) -> dict[str, str]:
    """Full path -> leaf name of every layer LoRA can wrap: torch Linear (plain, 4-bit or 8-bit)
    and GPT-2's Conv1D; the output head (lm_head, embed_out, a tied embedding) never."""
    import torch
    from transformers.pytorch_utils import Conv1D

    linear_types: tuple = (torch.nn.Linear, Conv1D)
    try:
        import bitsandbytes as bnb

        linear_types += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:  # pragma: no cover - bitsandbytes is a hard dependency, but planning needs none
        pass
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if isinstance(module, linear_types) and module is not head and not name.endswith("lm_head")}


def fused_expert_names(model) -> dict[str, str]:
    """Parameter path -> name of a mixture of experts' fused expert weights (Mixtral's
    `model.layers.0.mlp.experts.gate_up_proj`): LoRA reaches them through peft's `target_parameters`."""
    from orchestrator.planning.inventory import fused_expert_weights

    return {layer.path: layer.path.rsplit(".", 1)[-1] for layer in fused_expert_weights(model)}


def resolve_target_modules(target: str | list[str], model) -> list[str]:
    """The names LoRA targets for a preset (`attention`, `mlp`, `all-linear`: `parent.leaf`
    names, so GPT-2's `attn.c_proj` and `mlp.c_proj` stay apart, and Mixtral's `mlp` and
    `all-linear` include its fused expert weights `experts.gate_up_proj`, `experts.down_proj`,
    never its router) or a list."""
    return select_targets(target, {**linear_module_names(model), **fused_expert_names(model)})


def lora_config(spec: JobSpec, targets: list[str], model=None):
    """peft's `LoraConfig` for `targets`; with `model`, the names that select its fused expert
    weights become `target_parameters`. Raises `SpecError` for what those cannot take."""
    from peft import LoraConfig

    p = spec.peft
    modules, parameters = split_targets(targets, fused_expert_names(model) if model is not None else [])
    problems = fused_expert_problems(spec, parameters)
    if problems:
        raise SpecError(problems)
    return LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, use_dora=p.use_dora,
                      use_rslora=p.use_rslora, target_modules=modules, target_parameters=parameters or None,
                      bias="none", task_type="CAUSAL_LM")


def peft_config(spec: JobSpec, model, base_path: str):
    """The peft config of an adapter method, resolved against the live model."""
    import peft

    p = spec.peft
    if p.method == "lora":
        return lora_config(spec, resolve_target_modules(p.target_modules, model), model)
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


def trainable_model(spec: JobSpec, base_path: str, device: str, deepspeed_config: dict):
    """The model a training worker hands to DeepSpeed: the base loaded for `deepspeed_config`'s
    ZeRO stage (`loading.load_base_for_training`), made trainable as the spec says."""
    model = load_base_for_training(spec, base_path, device, deepspeed_config)
    model.config.use_cache = False
    model = prepare_for_training(spec, model, base_path)
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        # Built under zero.Init: DeepSpeed then leaves the module's dtype alone, so the adapter peft
        # added (fp32) is cast to the model dtype here, as DeepSpeed casts the whole module otherwise.
        from orchestrator.models.loading import torch_dtype

        for param in model.parameters():
            if param.requires_grad and not hasattr(param, "ds_id"):
                param.data = param.data.to(torch_dtype(spec.model.dtype))
    return model


# A freeze job saves only the tensors it trained, under this name, beside the job spec.
TRAINED_TENSORS = "trained_tensors.safetensors"


def load_trained_model(saved_dir: str | Path, spec: JobSpec, base_path: str, quantize: bool = True):
    """A trained model ready for inference: base + saved adapter, base + the tensors a freeze
    job trained, or the saved full model; on a CUDA GPU when there is one (`inference_device`)."""
    method = spec.peft.method
    if method == "full":
        model = load_base_for_inference(spec, str(saved_dir), quantize=False)
    elif method == "freeze":
        from safetensors.torch import load_file

        model = load_base_for_inference(spec, base_path, quantize=False)
        trained = load_file(str(Path(saved_dir) / TRAINED_TENSORS))
        missing = set(trained) - {n for n, _ in model.named_parameters()}
        if missing:
            raise ValueError(f"{saved_dir}: trained tensors {sorted(missing)[:3]} are not in the base {base_path}")
        model.load_state_dict(trained, strict=False)
    else:
        from peft import PeftModel

        # peft puts the adapter's weights beside the layers they adapt, wherever those are.
        model = PeftModel.from_pretrained(load_base_for_inference(spec, base_path, quantize=quantize), str(saved_dir))
    model.eval()
    return model
