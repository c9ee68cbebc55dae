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


def source_sha256(value: str, field_path: str = "data.train") -> str:
    """sha256 of a data source: a single file's bytes; for several files, of their names and
    sha256s; for a remote source, of its files' names, sizes and modification times (its bytes
    stay where they are). Raises OSError when a file cannot be read, `SpecError` for a source
    that names no file."""
    import hashlib

    from orchestrator.data.sources import resolve_source

    source = resolve_source(value, field_path)
    if source.remote:
        infos = source.filesystem().get_file_info(list(source.files))
        parts = [f"{i.path}\0{i.size}\0{i.mtime_ns}" for i in infos]
    elif len(source.files) == 1:
        return file_sha256(source.files[0])
    else:
        parts = [f"{Path(f).name}\0{file_sha256(f)}" for f in source.files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def data_files_sha256(data: DataSpec) -> dict[str, str]:
    """`source_sha256` of each data source the job names: `train_sha256`, and `eval_sha256` for
    an eval source."""
    return {f"{name}_sha256": source_sha256(value, f"data.{name}") for name in ("train", "eval")
            if isinstance(value := getattr(data, name), str)}
