"""The pure PEFT rules that the memory planner and the model loader (`models.adapters`) share:
which linear layers a target preset selects, what IA3 treats as feed-forward, what `freeze`
trains, and what a method asks of an architecture. No torch, no peft."""

from __future__ import annotations

from orchestrator.spec import JobSpec, Problem, SpecError

# Module-path words that mark a linear layer as attention or MLP. The closest ancestor that
# carries one decides (`model.layers.0.self_attn.q_proj`, `transformer.h.0.mlp.c_fc`,
# `gpt_neox.layers.0.attention.query_key_value`), so the two presets never share a layer.
_ATTENTION_WORDS = ("attn", "attention")
_MLP_WORDS = ("mlp", "feed_forward", "ffn")


def layer_kind(path: str) -> str:
    """`attention`, `mlp` or `other`: the role of the linear layer at module `path`."""
    for part in reversed(path.split(".")[:-1]):
        if any(w in part for w in _ATTENTION_WORDS):
            return "attention"
        if any(w in part for w in _MLP_WORDS):
            return "mlp"
    return "other"


def target_name(path: str) -> str:
    """The name peft targets a layer by: its parent and its own name (`attn.c_proj`, not the
    `c_proj` that GPT-2's MLP also has). peft matches a name at a module boundary at the end of
    a path, so `attn.c_proj` selects `transformer.h.<i>.attn.c_proj` in every block and nothing else."""
    return ".".join(path.split(".")[-2:])


def matches(name: str, path: str) -> bool:
    """Whether peft's target name `name` selects the module at `path` (whole name or a dotted tail)."""
    return path == name or path.endswith("." + name)


def select_targets(target: str | list[str], linears: dict[str, str]) -> list[str]:
    """Resolve a target preset or list against `linears` (module path -> leaf name; the output
    head is never among them); pure, so the memory planner resolves presets for an architecture
    exactly as training does. A preset resolves to `parent.leaf` names (`target_name`); a list
    is kept as written, each name checked to match a linear layer.

    Raises `SpecError` naming the modules there are when nothing (or a wrong name) matches.
    """
    available = sorted(set(linears.values()))
    if isinstance(target, list):
        unknown = [m for m in target if not any(matches(m, path) for path in linears)]
        if unknown:
            raise SpecError([Problem(path="peft.target_modules",
                                     message=f"the model has no linear module named {', '.join(unknown)}",
                                     fix=f"choose from {', '.join(available)}")])
        return list(target)
    chosen = sorted({target_name(path) for path in linears if target == "all-linear" or layer_kind(path) == target})
    if not chosen:
        raise SpecError([Problem(path="peft.target_modules",
                                 message=f"preset '{target}' matches no linear module of this model"
                                         + (" (its experts are fused parameters, not linear layers, and only "
                                            "LoRA reaches them)" if target == "mlp" else ""),
                                 fix=f"use all-linear or attention, or list module names from {', '.join(available)}")])
    return chosen


def split_targets(names: list[str], experts: dict[str, str] | list[str]) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) for peft: the names that select a fused expert weight
    (a parameter path among `experts`) go to peft's `target_parameters`, the rest name modules."""
    parameters = [n for n in names if any(matches(n, path) for path in experts)]
    return [n for n in names if n not in parameters], parameters


def fused_expert_problems(spec: JobSpec, target_parameters: list[str]) -> list[Problem]:
    """What LoRA on fused expert weights cannot take (peft's `ParamWrapper` refuses dropout and
    DoRA: the update is added to the weight, so there is no input of its own to drop or normalize)."""
    if not target_parameters:
        return []
    what = f"LoRA on the fused expert weights ({', '.join(target_parameters)})"
    attention_only = "target attention only (peft.target_modules: attention)"
    problems = []
    if spec.peft.dropout:
        problems.append(Problem(path="peft.dropout", message=f"{spec.peft.dropout} is not 0, and {what} takes no dropout",
                                fix=f"set peft.dropout: 0, or {attention_only}"))
    if spec.peft.use_dora:
        problems.append(Problem(path="peft.use_dora", message=f"{what} cannot be DoRA",
                                fix=f"set peft.use_dora: false, or {attention_only}"))
    return problems


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
    ones are the targets whose every matching layer sits inside the MLP (pure, shared with the planner)."""
    def feedforward(name: str) -> bool:
        kinds = {layer_kind(path) for path in linears if matches(name, path)}
        return kinds == {"mlp"}

    return [t for t in targets if feedforward(t)]


def freeze_selects(name: str, patterns: list[str] | None, last_n: int | None, num_layers: int) -> bool:
    """Whether `freeze` trains the parameter `name`: it matches one of `patterns` (regular
    expressions, searched in the name) or sits in one of the last `last_n` decoder blocks."""
    import re

    if any(re.search(p, name) for p in patterns or ()):
        return True
    block = re.search(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.", name)
    return bool(last_n and block and int(block.group(1)) >= num_layers - last_n)
