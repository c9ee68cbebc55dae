"""The architecture of `model.base` without its weights: the numbers of a decoder-only transformer
that decide its memory, read from a local `config.json`, a built-in model's recipe, the catalogue
of well-known hub ids (`planning.catalogue`), or (when reachable) the hub."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from orchestrator.planning.catalogue import CATALOGUE, _lookup, catalogue_config, default_cache_dir
from orchestrator.planning.inventory import LinearLayer, ParamTensor, meta_inventory
from orchestrator.planning.targets import architecture_problems
from orchestrator.spec import JobSpec, Problem, SpecError

# The Llama module names the planner (and PEFT's target presets) use; Mistral and Qwen share them.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTENTION_MODULES + MLP_MODULES
# The families the planner has its own formula for (checked against live DeepSpeed engines in
# tests/test_memory_measured.py); any other model type is counted from a meta-device build.
FORMULA_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class Architecture:
    """The numbers of a decoder-only transformer that decide its memory."""

    name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: q/k/v projections have biases
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head's queries and keys
    source: str = ""
    note: str = ""
    # Any other family: its parameters and linear layers as transformers builds them (meta device),
    # the experts of a mixture of experts, and the plan terms the Llama formula only estimates.
    tensors: tuple[ParamTensor, ...] = ()
    linears: tuple[LinearLayer, ...] = ()
    experts: int = 0
    experts_per_token: int = 0
    estimated: tuple[str, ...] = ()

    @property
    def counted(self) -> bool:
        """Whether the parameters come from a meta-device build rather than the Llama formula."""
        return bool(self.tensors)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder block."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def architecture_from_config(config: dict, name: str, source: str = "", note: str = "") -> Architecture:
    """An `Architecture` from a transformers `config.json` mapping: the Llama formula for the
    families it covers, a meta-device build (`planning.inventory`) for any other."""
    model_type = config.get("model_type", "")
    if model_type not in FORMULA_MODEL_TYPES:
        return _counted_architecture(config, name, source, note)
    heads = config["num_attention_heads"]
    return Architecture(
        name=name, model_type=model_type, vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"], num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
        qk_norm=model_type == "qwen3", source=source, note=note)


def _counted_architecture(config: dict, name: str, source: str, note: str) -> Architecture:
    model_type = config.get("model_type", "")
    try:
        inv = meta_inventory(config)
    except Exception as e:  # an unknown model_type, or a config transformers cannot build
        raise SpecError([Problem(path="model.base",
                                 message=f"transformers cannot build the architecture '{model_type or '?'}' of {name} "
                                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                                 fix="use a model whose config.json has a model_type this transformers "
                                     "version knows (or upgrade transformers)")]) from None
    d = inv.dims
    # The activation formula is Llama's, fed this config's dimensions: a mixture of experts runs
    # experts_per_token MLPs of intermediate_size per token, so its MLP activations scale by that.
    per_token = d["experts_per_token"] or 1
    estimated = (f"activations of {model_type} estimated with the Llama decoder-layer formula from the "
                 f"config's dimensions (hidden {d['hidden_size']}, MLP {d['intermediate_size']}"
                 + (f" x {per_token} of {d['experts']} experts per token" if d["experts"] else "")
                 + f", {d['num_heads']} heads / {d['num_kv_heads']} kv heads of {d['head_dim']}; "
                 "measured 0.6-1.5x the real peak, see docs/memory.md)",)
    return Architecture(
        name=name, model_type=model_type, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"] * per_token, num_layers=d["num_layers"], num_heads=d["num_heads"],
        num_kv_heads=d["num_kv_heads"], head_dim=d["head_dim"], tie_word_embeddings=inv.tied_embeddings,
        source=source, note=note, tensors=inv.tensors, linears=inv.linears, experts=d["experts"],
        experts_per_token=d["experts_per_token"], estimated=estimated)


def architecture_for(spec: JobSpec) -> Architecture:
    """Read the architecture of `model.base` without weights: a local `config.json`, a built-in
    model's recipe, the catalogue of well-known hub ids, or (when reachable) the hub. Raises
    `SpecError` when it cannot be read, or cannot take the job's peft method."""
    arch = _read_architecture(spec)
    problems = architecture_problems(spec, arch.model_type, arch.num_layers)
    if problems:
        raise SpecError(problems)
    return arch


def _read_architecture(spec: JobSpec) -> Architecture:
    base = spec.model.base
    if base.startswith("builtin:"):
        return _builtin_architecture(base)
    local = Path(base).expanduser()
    if (local / "config.json").is_file():
        config = json.loads((local / "config.json").read_text(encoding="utf-8"))
        return architecture_from_config(config, base, source=f"{local / 'config.json'}")
    config = catalogue_config(base)
    if config is not None:
        return architecture_from_config(config, base, source="built-in catalogue")
    try:
        config = hub_config(base, spec.model.revision)
    except Exception as e:  # offline, unknown repo, gated repo: all say the same to the user
        known = ", ".join(sorted(CATALOGUE))
        raise SpecError([Problem(path="model.base",
                                 message=f"cannot read the architecture of '{base}': not a local directory with a "
                                         f"config.json, not in the planner's catalogue, and the hub did not "
                                         f"answer ({str(e) or type(e).__name__})",
                                 fix=f"point model.base at a local model directory, or use a catalogue id: {known}")]
                        ) from None
    return architecture_from_config(config, base, source="Hugging Face hub")


def hub_config(repo: str, revision: str | None) -> dict:
    """`config.json` from the local hub cache, else from one request to the hub (5 s, no retries:
    huggingface_hub's own download retries for ~25 s when there is no network)."""
    import os
    import urllib.request

    from huggingface_hub import constants, get_token, hf_hub_url, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, "config.json", revision=revision)
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text(encoding="utf-8"))
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ConnectionError("HF_HUB_OFFLINE is set")
    token = get_token()
    request = urllib.request.Request(hf_hub_url(repo, "config.json", revision=revision),
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def _builtin_architecture(base: str) -> Architecture:
    try:
        recipe = _lookup(base)
    except ValueError as e:
        raise SpecError([Problem(path="model.base", message=str(e), fix="use builtin:tiny-llama")]) from None
    built = default_cache_dir() / recipe.dir_name() / "config.json"
    if built.is_file():  # the vocabulary size is only known once the tokenizer is trained
        config = json.loads(built.read_text(encoding="utf-8"))
        return architecture_from_config(config, base, source=f"{built}")
    config = {"model_type": "llama", "vocab_size": recipe.tokenizer_vocab_size, **recipe.model_config}
    note = f"not built yet: vocabulary taken as its upper bound {recipe.tokenizer_vocab_size}"
    return architecture_from_config(config, base, source="orchestrator/planning/catalogue.py", note=note)
