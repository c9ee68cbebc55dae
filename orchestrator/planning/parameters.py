"""The parameters of an architecture tensor by tensor, what each PEFT method trains (by the same
rules training uses, `planning.targets`), and the bytes of a quantized weight (pure)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from orchestrator.planning.architectures import ATTENTION_MODULES, LINEAR_MODULES, Architecture
from orchestrator.planning.inventory import ParamTensor
from orchestrator.planning.targets import (freeze_selects, fused_expert_problems, ia3_feedforward, layer_kind, matches,
                                           select_targets, split_targets)
from orchestrator.spec import JobSpec, SpecError

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

# bitsandbytes 4-bit storage (bitsandbytes.functional.quantize_4bit): 2 weights per byte, one
# absmax per 64 weights; with double quantization that absmax is itself 8-bit, with one fp32
# absmax per 256 of them, a 256-entry fp32 code book and an fp32 offset. Each tensor also has its
# 16-entry fp32 NF4/FP4 code.
NF4_BLOCKSIZE = 64
DOUBLE_QUANT_BLOCKSIZE = 256


def parameter_tensors(arch: Architecture) -> list[ParamTensor]:
    """Every parameter in transformers' order (embeddings, each layer, final norm, lm_head)."""
    if arch.counted:  # listed from a meta-device build
        return list(arch.tensors)
    h, d = arch.hidden_size, arch.head_dim
    out = [ParamTensor("model.embed_tokens.weight", arch.vocab_size * h, "embed_tokens")]
    for i in range(arch.num_layers):
        p = f"model.layers.{i}"
        for name, (fan_in, fan_out) in arch.linear_shapes().items():
            group = "self_attn" if name in ATTENTION_MODULES else "mlp"
            out.append(ParamTensor(f"{p}.{group}.{name}.weight", fan_in * fan_out, name, True, fan_out))
            if arch.qkv_bias and name in ("q_proj", "k_proj", "v_proj"):
                out.append(ParamTensor(f"{p}.{group}.{name}.bias", fan_out, name))
        if arch.qk_norm:
            out += [ParamTensor(f"{p}.self_attn.q_norm.weight", d, "q_norm"),
                    ParamTensor(f"{p}.self_attn.k_norm.weight", d, "k_norm")]
        out += [ParamTensor(f"{p}.input_layernorm.weight", h, "input_layernorm"),
                ParamTensor(f"{p}.post_attention_layernorm.weight", h, "post_attention_layernorm")]
    out.append(ParamTensor("model.norm.weight", h, "norm"))
    if not arch.tie_word_embeddings:  # tied: lm_head reuses the embedding matrix
        out.append(ParamTensor("lm_head.weight", arch.vocab_size * h, "lm_head"))
    return out


def lora_targets(arch: Architecture, target_modules: str | list[str], experts: bool = True) -> tuple[str, ...]:
    """The names a LoRA target preset or list resolves to, by the same rule training uses (with
    a mixture of experts' fused expert weights, which LoRA reaches and IA3 does not, unless
    `experts` is false)."""
    return tuple(select_targets(target_modules, _layer_paths(arch, experts)))


def targeted_roles(arch: Architecture, target_modules: str | list[str], experts: bool = True) -> tuple[str, ...]:
    """The Llama layers (q_proj, ..., down_proj) the activation formula treats as targeted: the
    layers themselves for the Llama families, and for any other the Llama layers of the same
    role (attention or MLP) as a targeted layer."""
    names = lora_targets(arch, target_modules, experts)
    if not arch.counted:
        return tuple(m for m in LINEAR_MODULES if any(matches(n, p) for n in names for p in _layer_paths(arch)
                                                       if p.endswith("." + m)))
    kinds = {layer_kind(layer.path) for layer in arch.linears if any(matches(n, layer.path) for n in names)}
    return tuple(m for m in LINEAR_MODULES if ("attention" if m in ATTENTION_MODULES else "mlp") in kinds)


def targeted_expert_elements(arch: Architecture, target_modules: str | list[str]) -> int:
    """Elements of the fused expert weights LoRA targets, every layer's together (0 for none)."""
    names = lora_targets(arch, target_modules)
    return sum(layer.experts * layer.in_features * layer.out_features for layer in arch.linears
               if layer.experts and any(matches(n, layer.path) for n in names))


# What each method trains, in the plan's words.
METHOD_TRAINS = {"full": "all parameters", "freeze": "selected base parameters", "lora": "LoRA parameters",
                 "ia3": "IA3 scaling vectors", "prompt_tuning": "virtual token embeddings",
                 "prefix_tuning": "prefix keys and values", "adaption_prompt": "adaption prompts and gates"}


def _layer_paths(arch: Architecture, experts: bool = True) -> dict[str, str]:
    """Module path -> leaf name of the linear layers, as transformers names them (one block's
    for the Llama families, every layer of a meta-device build for any other, with the fused
    expert weights of a mixture of experts unless `experts` is false)."""
    if arch.counted:
        return {layer.path: layer.path.rsplit(".", 1)[-1] for layer in arch.linears if experts or not layer.experts}
    return {f"model.layers.0.{'self_attn' if m in ATTENTION_MODULES else 'mlp'}.{m}": m for m in LINEAR_MODULES}


def _linear_layers(arch: Architecture) -> list[tuple[str, int, int, int]]:
    """(path, in_features, out_features, experts) of every linear layer LoRA could wrap (experts:
    0 for a layer, E for a fused expert weight of E matrices)."""
    if arch.counted:
        return [(layer.path, layer.in_features, layer.out_features, layer.experts) for layer in arch.linears]
    return [(f"model.layers.{i}.{'self_attn' if m in ATTENTION_MODULES else 'mlp'}.{m}", fan_in, fan_out, 0)
            for i in range(arch.num_layers) for m, (fan_in, fan_out) in arch.linear_shapes().items()]


def trainable_tensors(spec: JobSpec, arch: Architecture) -> list[ParamTensor]:
    """What the optimizer trains, tensor by tensor, exactly as peft builds it:
    full: every parameter; freeze: the parameters it selects; lora: A (r x in) and B (out x r)
    on each targeted linear layer of each block (+ DoRA's magnitude, one per output); on a fused
    expert weight of E experts, peft's `ParamWrapper` holds A (r*E x in) and B (out x r*E);
    ia3: one vector per targeted layer (its input width for feed-forward layers, else its output);
    prompt_tuning: the virtual tokens' embeddings; prefix_tuning: a key and a value per virtual
    token and layer (key/value heads x head_dim wide); adaption_prompt: a prompt and a gate on
    each adapted (top) layer."""
    p, method = spec.peft, spec.peft.method
    h, n_layers = arch.hidden_size, arch.num_layers
    if method == "full":
        return parameter_tensors(arch)
    if method == "freeze":
        return [t for t in parameter_tensors(arch)
                if freeze_selects(t.name, p.trainable_patterns, p.last_n_layers, n_layers)]
    if method == "prompt_tuning":
        return [ParamTensor("prompt_encoder.embedding", p.virtual_tokens * h, "prompt")]
    if method == "prefix_tuning":
        kv = arch.num_kv_heads * arch.head_dim
        return [ParamTensor("prompt_encoder.embedding", p.virtual_tokens * n_layers * 2 * kv, "prefix")]
    if method == "adaption_prompt":
        adapted = range(n_layers - (p.adapter_layers or n_layers), n_layers)
        return [t for i in adapted for t in (ParamTensor(f"layers.{i}.adaption_prompt", p.prompt_len * h, "prompt"),
                                             ParamTensor(f"layers.{i}.adaption_gate", 1, "prompt"))]
    targets = lora_targets(arch, p.target_modules, experts=method == "lora")
    layers = [x for x in _linear_layers(arch) if any(matches(t, x[0]) for t in targets)]
    out = []
    if method == "ia3":
        feedforward = ia3_feedforward(list(targets), _layer_paths(arch, experts=False))
        for path, fan_in, fan_out, _ in layers:
            ff = any(matches(t, path) for t in feedforward)
            out.append(ParamTensor(f"{path}.ia3", fan_in if ff else fan_out, path.rsplit(".", 1)[-1]))
        return out
    problems = fused_expert_problems(spec, split_targets(list(targets), [x[0] for x in layers if x[3]])[1])
    if problems:
        raise SpecError(problems)
    r = p.r
    for path, fan_in, fan_out, experts in layers:
        leaf, rank = path.rsplit(".", 1)[-1], r * max(experts, 1)
        out += [ParamTensor(f"{path}.lora_A", rank * fan_in, leaf), ParamTensor(f"{path}.lora_B", fan_out * rank, leaf)]
        if p.use_dora:
            out.append(ParamTensor(f"{path}.lora_magnitude", fan_out, leaf))
    return out


@dataclass(frozen=True)
class ParamCount:
    total: int
    trainable: int
    largest: int  # elements of the model's largest parameter tensor (what ZeRO-3 gathers at once)


def count_params(arch: Architecture, spec: JobSpec | None = None) -> ParamCount:
    """Parameters of the model, and of what `spec` trains (all of them without a spec)."""
    tensors = parameter_tensors(arch)
    total = sum(t.numel for t in tensors)
    trainable = total if spec is None else sum(t.numel for t in trainable_tensors(spec, arch))
    return ParamCount(total=total, trainable=trainable, largest=max((t.numel for t in tensors), default=0))


def quantized_bytes(numel: int, out_features: int, bits: int, double_quant: bool) -> tuple[int, int]:
    """(weight storage, quantization constants) of one linear weight in bitsandbytes."""
    if bits == 8:
        # Int8Params: int8 weights plus one fp32 scale per output row (SCB).
        return numel, 4 * out_features
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    code = 16 * 4
    if double_quant:
        constants = blocks + 4 * math.ceil(blocks / DOUBLE_QUANT_BLOCKSIZE) + 256 * 4 + 4 + code
    else:
        constants = 4 * blocks + code
    return (numel + 1) // 2, constants
