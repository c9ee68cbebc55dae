"""The pure PEFT rules that the memory planner and the model loader (`models.adapters`) share:
which linear layers a target preset selects, what IA3 treats as feed-forward, what `freeze`
trains, and what a method asks of an architecture. No torch, no peft."""

from __future__ import annotations

from orchestrator.spec import JobSpec, Problem, SpecError

# Module-path words that mark a linear layer as attention or MLP. Matching on the path
# (`model.layers.0.self_attn.q_proj`, `transformer.h.0.mlp.c_fc`) works across Llama,
# Mistral, Qwen, GPT-NeoX and Falcon without a per-architecture table.
_ATTENTION_WORDS = ("attn", "attention")
_MLP_WORDS = ("mlp", "feed_forward", "ffn")


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
