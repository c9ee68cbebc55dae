"""A catalogue of well-known architectures, so the memory planner works offline.

Each entry is the part of the model's `config.json` on the Hugging Face hub that decides how
many parameters it has and how large its activations are; nothing else. The values are the
published config.json fields of each repository, written down here (the hub is not asked), so
the planner works offline. The Llama families (llama, mistral, qwen2, qwen3) are counted by the
planner's own formula; any other family (phi3, gemma2, mixtral, falcon) from transformers' model
built on the meta device (`planning.inventory`). The planner reads a
local `config.json` the same way, so a catalogue entry and a downloaded config plan alike.
`tests/test_memory_plan.py` builds every entry with transformers on the `meta` device and checks
that the planner's count equals transformers' own.

The built-in demo models' recipes (`BUILTIN_MODELS`) and where they are cached live here too:
the planner reads a recipe's architecture before the model is built, and the data cache shares
the cache root; `models.builtin` builds them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_LLAMA2_7B = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
              "max_position_embeddings": 4096, "tie_word_embeddings": False}
_LLAMA2_13B = {**_LLAMA2_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
               "num_attention_heads": 40, "num_key_value_heads": 40}
_LLAMA2_70B = {**_LLAMA2_7B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
               "num_attention_heads": 64, "num_key_value_heads": 8}
_LLAMA1_7B = {**_LLAMA2_7B, "max_position_embeddings": 2048}
_LLAMA1_65B = {**_LLAMA1_7B, "hidden_size": 8192, "intermediate_size": 22016, "num_hidden_layers": 80,
               "num_attention_heads": 64, "num_key_value_heads": 64}
_LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
              "max_position_embeddings": 8192, "tie_word_embeddings": False}
_LLAMA3_70B = {**_LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
               "num_attention_heads": 64}
_LLAMA32_1B = {**_LLAMA3_8B, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
               "head_dim": 64, "max_position_embeddings": 131072, "tie_word_embeddings": True}
_LLAMA32_3B = {**_LLAMA32_1B, "hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 24,
               "head_dim": 128}
_MISTRAL_7B = {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
               "max_position_embeddings": 32768, "tie_word_embeddings": False}
_QWEN25_7B = {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
              "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
              "max_position_embeddings": 131072, "tie_word_embeddings": False}
_QWEN25_05B = {**_QWEN25_7B, "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
               "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
               "max_position_embeddings": 32768, "tie_word_embeddings": True}
_QWEN25_14B = {**_QWEN25_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 48,
               "num_attention_heads": 40, "num_key_value_heads": 8}
_QWEN25_72B = {**_QWEN25_7B, "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
               "num_attention_heads": 64, "num_key_value_heads": 8}
_QWEN25_15B = {**_QWEN25_05B, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
               "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 131072}
_QWEN25_3B = {**_QWEN25_05B, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
              "num_attention_heads": 16, "num_key_value_heads": 2}
_QWEN25_32B = {**_QWEN25_7B, "hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64,
               "num_attention_heads": 40, "num_key_value_heads": 8}
_PHI3_MINI_4K = {"model_type": "phi3", "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192,
                 "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                 "max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
                 "sliding_window": 2047, "pad_token_id": 32000, "tie_word_embeddings": False}
_GEMMA2_9B = {"model_type": "gemma2", "vocab_size": 256000, "hidden_size": 3584, "intermediate_size": 14336,
              "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
              "query_pre_attn_scalar": 256, "sliding_window": 4096, "max_position_embeddings": 8192,
              "tie_word_embeddings": True}
_MIXTRAL_8X7B = {"model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                 "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 32768,
                 "tie_word_embeddings": False}
_FALCON_7B = {"model_type": "falcon", "vocab_size": 65024, "hidden_size": 4544, "num_hidden_layers": 32,
              "num_attention_heads": 71, "multi_query": True, "parallel_attn": True, "bias": False,
              "new_decoder_architecture": False, "alibi": False, "bos_token_id": 11, "eos_token_id": 11}
_QWEN3_8B = {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
             "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
             "max_position_embeddings": 40960, "tie_word_embeddings": False, "attention_bias": False}

CATALOGUE: dict[str, dict] = {
    "meta-llama/Llama-2-7b-hf": _LLAMA2_7B,
    "meta-llama/Llama-2-7b-chat-hf": _LLAMA2_7B,
    "meta-llama/Llama-2-13b-hf": _LLAMA2_13B,
    "meta-llama/Llama-2-13b-chat-hf": _LLAMA2_13B,
    "meta-llama/Llama-2-70b-hf": _LLAMA2_70B,
    "meta-llama/Llama-2-70b-chat-hf": _LLAMA2_70B,
    "huggyllama/llama-7b": _LLAMA1_7B,
    "huggyllama/llama-65b": _LLAMA1_65B,
    "meta-llama/Meta-Llama-3-8B": _LLAMA3_8B,
    "meta-llama/Meta-Llama-3-8B-Instruct": _LLAMA3_8B,
    "meta-llama/Meta-Llama-3-70B": _LLAMA3_70B,
    "meta-llama/Meta-Llama-3-70B-Instruct": _LLAMA3_70B,
    "meta-llama/Llama-3.1-8B": {**_LLAMA3_8B, "max_position_embeddings": 131072},
    "meta-llama/Llama-3.1-70B": {**_LLAMA3_70B, "max_position_embeddings": 131072},
    "meta-llama/Llama-3.2-1B": _LLAMA32_1B,
    "meta-llama/Llama-3.2-3B": _LLAMA32_3B,
    "mistralai/Mistral-7B-v0.1": _MISTRAL_7B,
    "mistralai/Mistral-7B-Instruct-v0.2": _MISTRAL_7B,
    "Qwen/Qwen2.5-0.5B": _QWEN25_05B,
    "Qwen/Qwen2.5-1.5B": _QWEN25_15B,
    "Qwen/Qwen2.5-3B": _QWEN25_3B,
    "Qwen/Qwen2.5-7B": _QWEN25_7B,
    "Qwen/Qwen2.5-7B-Instruct": _QWEN25_7B,
    "Qwen/Qwen2.5-14B": _QWEN25_14B,
    "Qwen/Qwen2.5-32B": _QWEN25_32B,
    "Qwen/Qwen2.5-72B": _QWEN25_72B,
    "microsoft/Phi-3-mini-4k-instruct": _PHI3_MINI_4K,
    "google/gemma-2-9b": _GEMMA2_9B,
    "mistralai/Mixtral-8x7B-v0.1": _MIXTRAL_8X7B,
    "tiiuae/falcon-7b": _FALCON_7B,
    "Qwen/Qwen3-8B": _QWEN3_8B,
}


def catalogue_config(hub_id: str) -> dict | None:
    """The catalogued config for a hub id (exact, else case-insensitive), or None."""
    if hub_id in CATALOGUE:
        return dict(CATALOGUE[hub_id])
    folded = {k.lower(): v for k, v in CATALOGUE.items()}
    found = folded.get(hub_id.lower())
    return dict(found) if found else None


# --------------------------------------------------------------------------------------
# Built-in models: the recipes (`models.builtin` builds them)
# --------------------------------------------------------------------------------------


BUILTIN_PREFIX = "builtin:"

# Bump when the corpus generator or build procedure changes in a way that changes
# the produced model (it is part of the recipe hash, so caches are invalidated).
CORPUS_VERSION = "tiny-world-v1"
BUILD_VERSION = "2"  # 2: numerics pinned, the same bytes on any x86-64 CPU with AVX2 (models.builtin.PINNED_NUMERICS)


@dataclass(frozen=True)
class BuiltinModelSpec:
    """Everything that determines a built-in model (hashed into its cache directory)."""

    name: str
    description: str
    model_config: dict[str, Any] = field(default_factory=dict)
    tokenizer_vocab_size: int = 1024
    tokenizer_docs: int = 20000
    seed: int = 1234
    steps: int = 1200
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 6e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    corpus_version: str = CORPUS_VERSION
    build_version: str = BUILD_VERSION

    def recipe(self) -> dict[str, Any]:
        """The fields that determine the built artifacts (``description`` excluded)."""
        recipe = dataclasses.asdict(self)
        recipe.pop("description")
        return recipe

    def recipe_hash(self) -> str:
        blob = json.dumps(self.recipe(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def dir_name(self) -> str:
        return f"{self.name}-{self.recipe_hash()}"


BUILTIN_MODELS: dict[str, BuiltinModelSpec] = {
    "tiny-llama": BuiltinModelSpec(
        name="tiny-llama",
        description=(
            "~0.8M-parameter Llama (3 layers, hidden 128, GQA 4/2 heads) with a 1k byte-level "
            "BPE tokenizer, pre-trained in about a minute and a half on one CPU core on a synthetic "
            "closed-world English corpus plus generic Alpaca-format instructions."
        ),
        model_config=dict(
            hidden_size=128,
            # Every linear layer's input width must be a multiple of 64: bitsandbytes' CPU 4-bit
            # kernel reshapes weights into 64-wide quantization blocks (352 fails, 384 works).
            intermediate_size=384,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            initializer_range=0.02,
            tie_word_embeddings=False,
            hidden_act="silu",
        ),
    ),
}


def is_builtin(base: str) -> bool:
    """True if ``base`` names a built-in model (``builtin:<name>``)."""
    return isinstance(base, str) and base.startswith(BUILTIN_PREFIX)


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/orchestrator` (default `~/.cache/orchestrator`): built-in bases, tokenized data."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "orchestrator"


def default_cache_dir() -> Path:
    return cache_root() / "builtin"


def _lookup(base: str) -> BuiltinModelSpec:
    name = base[len(BUILTIN_PREFIX) :] if is_builtin(base) else base
    spec = BUILTIN_MODELS.get(name)
    if spec is None:
        known = ", ".join(BUILTIN_PREFIX + k for k in sorted(BUILTIN_MODELS))
        raise ValueError(f"unknown built-in model {base!r}; known built-in models: {known}")
    return spec
