"""Hashing files: the data files' sha256 (lineage, the tokenized-data cache key) and the helper
that feeds any file, weights included, into a digest."""

from __future__ import annotations

from pathlib import Path

from orchestrator.spec import DataSpec


def hash_file(digest, path) -> None:
    """Feed a file's bytes into `digest` in 16 MiB chunks (weights can be many GB)."""
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)


def file_sha256(path: str | Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    hash_file(digest, path)
    return digest.hexdigest()


def data_files_sha256(data: DataSpec) -> dict[str, str]:
    """sha256 of each data file the job names: `train_sha256`, and `eval_sha256` for an eval file.
    Raises OSError when a file cannot be read."""
    return {f"{name}_sha256": file_sha256(path) for name in ("train", "eval")
            if isinstance(path := getattr(data, name), str)}
