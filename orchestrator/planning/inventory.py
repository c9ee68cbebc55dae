"""The parameters and linear layers of any decoder transformers can build, listed from its
config on the `meta` device: no weights are read, no memory is allocated, the hub is not asked.

This is how the planner counts an architecture it has no formula for (gpt2, phi3, gemma2,
gpt_neox, falcon, mixtral, ...): the count is transformers' own, tensor by tensor. torch and
transformers are imported inside `meta_inventory` only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParamTensor:
    """One parameter tensor of the model, as transformers creates it."""

    name: str
    numel: int
    module: str  # leaf module: q_proj, ..., embed_tokens, lm_head, norm
    quantizable: bool = False  # a decoder linear weight: bitsandbytes replaces it when quantizing
    out_features: int = 0


@dataclass(frozen=True)
class LinearLayer:
    """A layer peft's LoRA can wrap, the output head excluded: a torch Linear or GPT-2's Conv1D
    (a module), or a mixture of experts' fused expert weight, one 3-D parameter holding every
    expert's matrix (Mixtral's `mlp.experts.gate_up_proj`), which LoRA reaches through peft's
    `target_parameters`."""

    path: str  # model.layers.0.self_attn.q_proj, transformer.h.0.attn.c_attn, model.layers.0.mlp.experts.down_proj
    in_features: int
    out_features: int
    experts: int = 0  # a fused expert weight: the experts it holds (each in_features -> out_features)


@dataclass(frozen=True)
class Inventory:
    """What a meta-device build of a config holds."""

    tensors: tuple[ParamTensor, ...]
    linears: tuple[LinearLayer, ...]
    tied_embeddings: bool
    dims: dict  # hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim, vocab_size


def build_config(config: dict):
    """A transformers config object of `config["model_type"]`. Raises ValueError (transformers'
    own) when transformers does not know the model type."""
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k != "model_type"}
    return AutoConfig.for_model(config["model_type"], **fields)


def meta_inventory(config: dict) -> Inventory:
    """Every parameter (tied weights once, as `model.parameters()` yields them), the linear layers
    and which weights bitsandbytes would quantize, from a meta-device build of `config`."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module
    from transformers.utils import logging

    cfg = build_config(config)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a tiny config's token ids outside its vocabulary: not ours to warn about
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    finally:
        logging.set_verbosity(verbosity)
    # transformers.integrations.bitsandbytes.replace_with_bnb_linear: exactly nn.Linear or Conv1D
    # (subclasses such as FalconLinear stay unquantized), except the output head, tied weights,
    # the last parameter's module and the model's fp32 modules (quantizers/base.py).
    keep = get_keys_to_not_convert(model) + list(getattr(model, "_keep_in_fp32_modules", None) or ())
    head = model.get_output_embeddings()
    owner = {}
    linears = []
    for path, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owner[f"{path}.{pname}" if path else pname] = (path, module)
        if module is head or not isinstance(module, (torch.nn.Linear, Conv1D)):
            continue
        fan_in, fan_out = ((module.weight.shape[0], module.weight.shape[1]) if isinstance(module, Conv1D)
                           else (module.in_features, module.out_features))
        linears.append(LinearLayer(path, int(fan_in), int(fan_out)))
    linears += fused_expert_weights(model)
    tensors = []
    for name, param in model.named_parameters():
        path, module = owner.get(name, (name.rsplit(".", 1)[0], None))
        quantizable = (name.endswith(".weight") and module is not None
                       and (type(module) is torch.nn.Linear or isinstance(module, Conv1D))
                       and should_convert_module(path, keep))
        out = int(param.shape[-1] if isinstance(module, Conv1D) else param.shape[0]) if quantizable else 0
        tensors.append(ParamTensor(name, int(param.numel()), type(module).__name__ if module is not None else "",
                                   quantizable, out))
    return Inventory(tensors=tuple(tensors), linears=tuple(linears),
                     tied_embeddings=bool(getattr(model, "all_tied_weights_keys", None)), dims=_dims(cfg))


def fused_expert_weights(model) -> list[LinearLayer]:
    """The 3-D parameters of `model` (experts x out x in, or experts x in x out where the module
    says `is_transposed`, as peft's `ParamWrapper` reads them): the fused experts of a mixture of
    experts in transformers 5. A router is a 2-D weight, so it is never among them."""
    out = []
    for path, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            shape = tuple(getattr(param, "ds_shape", None) or param.shape)
            if len(shape) == 3:
                experts, a, b = shape
                fan_in, fan_out = (a, b) if getattr(module, "is_transposed", False) else (b, a)
                out.append(LinearLayer(f"{path}.{name}", int(fan_in), int(fan_out), int(experts)))
    return out


def _dims(cfg) -> dict:
    """The dimensions the activation formula needs, under whichever names the config uses
    (transformers' attribute_map turns n_embd, n_head, n_layer into the common names)."""
    h = cfg.hidden_size
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_kv_heads", None) or heads
    if getattr(cfg, "multi_query", False) and not getattr(cfg, "new_decoder_architecture", False):
        kv = 1  # Falcon-7B: one key/value head
    inter = (getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None)
             or getattr(cfg, "ffn_hidden_size", None) or 4 * h)
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or 0
    per_token = getattr(cfg, "num_experts_per_tok", None) or 0
    return {"hidden_size": h, "intermediate_size": inter, "num_layers": cfg.num_hidden_layers, "num_heads": heads,
            "num_kv_heads": kv, "head_dim": getattr(cfg, "head_dim", None) or h // heads,
            "vocab_size": cfg.vocab_size, "experts": experts, "experts_per_token": per_token}
