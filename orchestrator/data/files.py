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
    """sha256 of each data source the job names: `train_sha256`, and `eval_sha256` for an eval
    source. A source of several files: the sha256 of their names and sha256s; a remote one: of
    its files' names, sizes and modification times (its bytes stay where they are). Raises
    OSError when a file cannot be read (and `SpecError` for a source that names no file)."""
    import hashlib

    from orchestrator.data.sources import resolve_source

    out = {}
    for name in ("train", "eval"):
        value = getattr(data, name)
        if not isinstance(value, str):
            continue
        source = resolve_source(value, f"data.{name}")
        if source.remote:
            infos = source.filesystem().get_file_info(list(source.files))
            parts = [f"{i.path}\0{i.size}\0{i.mtime_ns}" for i in infos]
        elif len(source.files) == 1:
            out[f"{name}_sha256"] = file_sha256(source.files[0])
            continue
        else:
            parts = [f"{Path(f).name}\0{file_sha256(f)}" for f in source.files]
        out[f"{name}_sha256"] = hashlib.sha256("\n".join(parts).encode()).hexdigest()
    return out
