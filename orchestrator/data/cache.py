"""Tokenized data sets, cached across runs of a job by everything they depend on: a job run again
loads no tokenizer (and imports no transformers) and tokenizes nothing."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.data.files import data_files_sha256, hash_file
from orchestrator.data.records import DataSets, Example
from orchestrator.data.tokenize import load_datasets
from orchestrator.planning.catalogue import cache_root
from orchestrator.spec import DataSpec

# What reads, formats and tokenizes records, and this file (the cached format): changing any of
# them changes every cache key.
_CODE = tuple(Path(__file__).with_name(name) for name in ("records.py", "formats.py", "tokenize.py", "cache.py"))
# A base's weight files: large, and not the tokenizer's, so left out of the cache key.
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz"}
CACHE_KEEP = 16  # the most recently used data sets the cache keeps


def tokenized_cache_key(data: DataSpec, seed: int, base_path: str, files_sha256: dict[str, str],
                        trust_remote_code: bool = False) -> str:
    """sha256 of everything the tokenized data sets depend on: the spec's data section, the seed
    (it splits off an eval fraction), the data files (`files_sha256`), the base's files other than
    weights (the tokenizer, its chat template), the code that formats and tokenizes, and the
    transformers and tokenizers versions. Raises OSError when a file cannot be read."""
    import hashlib
    from importlib.metadata import version

    digest = hashlib.sha256(json.dumps(
        {"data": data.model_dump(mode="json"), "seed": seed, "trust_remote_code": trust_remote_code,
         "files": files_sha256, "versions": [version("transformers"), version("tokenizers")]},
        sort_keys=True).encode())
    files = sorted(f for f in Path(base_path).iterdir() if f.is_file() and f.suffix not in _WEIGHT_SUFFIXES)
    for f in files + list(_CODE):
        digest.update(f.name.encode() + b"\0")
        hash_file(digest, f)
    return digest.hexdigest()


def prepare_datasets(data: DataSpec, seed: int, base_path: str, trust_remote_code: bool = False,
                     cache_dir: Path | None = None, revision: str | None = None) -> tuple[DataSets, Path | None]:
    """The job's tokenized data sets (with the data files' sha256), and the cache file they came
    from (None when they were tokenized now). A job run again with the same data, base and
    settings skips loading the tokenizer (and importing transformers) and tokenizing; problems with
    the data are raised as `load_datasets` raises them (only data that tokenized without one is
    cached)."""
    import contextlib

    cache_dir = cache_dir or cache_root() / "tokenized"
    try:
        files_sha256 = data_files_sha256(data)
    except OSError:  # a data file that cannot be read: load_datasets names the problem
        files_sha256 = None
    path = None
    if files_sha256 is not None:
        with contextlib.suppress(OSError):  # a base file that cannot be read: no caching
            path = cache_dir / f"{tokenized_cache_key(data, seed, base_path, files_sha256, trust_remote_code)}.json"
    if path is not None and path.is_file():
        try:
            cached = _read_cached(path)
            path.touch()  # recently used: kept
            cached.files_sha256 = files_sha256
            return cached, path
        except (OSError, ValueError, KeyError, TypeError):
            pass  # damaged or from another version: tokenized again and rewritten
    from orchestrator.data.tokenize import load_tokenizer

    datasets = load_datasets(data, load_tokenizer(base_path, trust_remote_code, revision, data.chat_template), seed)
    datasets.files_sha256 = files_sha256 or {}
    if path is not None:
        _write_cached(path, datasets)
    return datasets, None


def _read_cached(path: Path) -> DataSets:
    raw = json.loads(path.read_text(encoding="utf-8"))
    examples = {split: [Example(input_ids=ids, labels=labels) for ids, labels in raw[split]]
                for split in ("train", "eval")}
    return DataSets(train=examples["train"], eval=examples["eval"], stats=raw["stats"], pad_id=raw["pad_id"])


def _write_cached(path: Path, datasets: DataSets) -> None:
    """Write atomically (a concurrent run reads the old file or the new one), then keep the
    `CACHE_KEEP` most recently used files. Best effort: a cache that cannot be written is skipped."""
    import contextlib
    import os
    import tempfile

    raw = {"pad_id": datasets.pad_id, "stats": datasets.stats,
           **{split: [[e.input_ids, e.labels] for e in getattr(datasets, split)] for split in ("train", "eval")}}
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(raw, fh, separators=(",", ":"))
        os.replace(tmp, path)
        for old in sorted(path.parent.glob("*.json"), key=lambda f: f.stat().st_mtime, reverse=True)[CACHE_KEEP:]:
            old.unlink(missing_ok=True)
