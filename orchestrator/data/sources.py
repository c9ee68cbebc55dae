"""Where a job's records come from: `data.train` / `data.eval` name a JSONL or Parquet file, a
directory or glob of them, or a URI Ray Data and pyarrow read (s3://, gs://). This module finds
the files of a source and streams its records on the driver (validation, the few generation
prompts, small data sets); `pipeline` reads large ones with Ray Data."""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from orchestrator.data.records import COMPRESSED_SUFFIXES, _data_error, open_jsonl, parse_line, scan_jsonl
from orchestrator.spec.checks import is_glob, is_uri

PARQUET_SUFFIXES = (".parquet",)
JSONL_SUFFIXES = tuple(f"{name}{codec}" for name in (".jsonl", ".json") for codec in ("", *COMPRESSED_SUFFIXES))


@dataclass(frozen=True)
class Source:
    """The files of one data source, in a fixed (sorted) order, and their format."""

    value: str  # as the job names it
    field_path: str  # data.train or data.eval, for problems
    files: tuple[str, ...]  # local paths, or paths inside `filesystem`'s bucket
    format: str  # jsonl or parquet
    remote: bool

    def filesystem(self):
        """The pyarrow filesystem of a remote source (credentials from the environment); None locally."""
        if not self.remote:
            return None
        from pyarrow import fs

        return fs.FileSystem.from_uri(self.value)[0]

    def label(self, path: str) -> str:
        return f"{self.value.split('://')[0]}://{path}" if self.remote else path


def _format_of(files: list[str], value: str, field_path: str) -> str:
    kinds = {"parquet" if f.endswith(PARQUET_SUFFIXES) else "jsonl" for f in files}
    if len(kinds) > 1:
        raise _data_error(field_path, f"{value} mixes Parquet and JSONL files",
                          "keep one format per source (or name the files with a glob such as data/*.jsonl)")
    return kinds.pop()


def _data_files(names: list[str]) -> list[str]:
    return sorted(n for n in names if n.endswith(PARQUET_SUFFIXES + JSONL_SUFFIXES))


def resolve_source(value: str, field_path: str = "data.train") -> Source:
    """The files `value` names (a file, a directory, a glob, or a URI of either); raises a
    `SpecError` naming `field_path` when there are none."""
    if is_uri(value):
        from pyarrow import fs

        try:
            filesystem, path = fs.FileSystem.from_uri(value)
            info = filesystem.get_file_info(path)
            if info.type == fs.FileType.Directory:
                infos = filesystem.get_file_info(fs.FileSelector(path, recursive=True))
                files = _data_files([i.path for i in infos if i.type == fs.FileType.File])
            else:
                files = [path] if info.type == fs.FileType.File else []
        except (OSError, ValueError) as e:
            raise _data_error(field_path, f"cannot read {value} ({e})",
                              "check the URI and that the credentials in the environment reach it") from None
        if not files:
            raise _data_error(field_path, f"no data files at {value}",
                              "point it at a JSONL or Parquet file, or a prefix holding some")
        return Source(value, field_path, tuple(files), _format_of(files, value, field_path), remote=True)
    path = Path(value)
    if is_glob(value) and not path.exists():
        files = sorted(f for f in glob.glob(value, recursive=True) if Path(f).is_file())
        if not files:
            raise _data_error(field_path, f"no files match {value}", "fix the pattern, e.g. data/*.jsonl")
    elif path.is_dir():
        files = _data_files([str(f) for f in path.rglob("*") if f.is_file()])
        if not files:
            raise _data_error(field_path, f"the directory {value} holds no .jsonl or .parquet files",
                              "put the data files in it, or name one file")
    elif path.is_file():
        files = [str(path)]
    else:
        raise _data_error(field_path, f"file not found: {value}", "point it at an existing JSONL file")
    return Source(value, field_path, tuple(files), _format_of(files, value, field_path), remote=False)


def iter_records(source: Source) -> Iterator[tuple[str, dict]]:
    """(where, record) for each record of the source, streamed: `where` names the file and line
    (JSONL) or row (Parquet) for problems. A bad JSONL line raises a `SpecError`."""
    filesystem = source.filesystem()
    for path in source.files:
        label = source.label(path)
        if source.format == "parquet":
            import pyarrow.parquet as pq

            row = 0
            for batch in pq.ParquetFile(path, filesystem=filesystem).iter_batches(batch_size=1024):
                for record in batch.to_pylist():
                    row += 1
                    yield f"{label}: row {row}", record
        elif filesystem is not None:
            with open_jsonl(path, filesystem) as lines:
                for number, line in enumerate(lines, start=1):
                    if line.strip():
                        yield f"{label}:{number}", parse_line(line, label, number, source.field_path)
        else:
            for number, record in scan_jsonl(path, source.field_path):
                yield f"{label}:{number}", record


def source_bytes(source: Source, limit: int | None = None) -> int:
    """The source's size in bytes as data (what decides between tokenizing on the driver and on
    Ray Data): a compressed JSONL file counts as the text it holds, decompressed as far as `limit`
    (the count stops once past it: past `limit` is all the caller asks), a Parquet file as its
    columns decoded (`_parquet_bytes`). A remote source: its files' sizes."""
    if source.remote:
        return sum(i.size for i in source.filesystem().get_file_info(list(source.files)))
    total = 0
    for f in source.files:
        total += _data_bytes(f, None if limit is None else limit - total)
        if limit is not None and total > limit:
            break
    return total


def _data_bytes(path: str, limit: int | None) -> int:
    size = Path(path).stat().st_size
    if path.endswith(".parquet"):
        return max(size, _parquet_bytes(path))
    if not path.endswith(COMPRESSED_SUFFIXES):
        return size
    import pyarrow as pa

    total = 0
    try:
        with pa.input_stream(path, compression="detect") as stream:
            while limit is None or total <= limit:
                chunk = stream.read(1 << 20)
                if not chunk:
                    break
                total += len(chunk)
    except OSError:  # not compressed as its name says: reading it names the file (scan_jsonl)
        return size
    return total


# How many rows of a Parquet file are read to size its rows decoded (`_parquet_bytes`).
PARQUET_SAMPLE_ROWS = 1024


def _parquet_bytes(path: str) -> int:
    """A Parquet file's columns uncompressed: the larger of what its metadata says and its first
    rows' decoded size scaled to all its rows. The metadata counts a dictionary-encoded value
    once however often it repeats (a system prompt in every row), where reading decodes each."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as f:
        meta = f.metadata
        stored = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        first = next(f.iter_batches(batch_size=PARQUET_SAMPLE_ROWS), None)
    if first is None or not first.num_rows:
        return stored
    return max(stored, first.nbytes * meta.num_rows // first.num_rows)


def first_eval_records(data, seed: int, n: int) -> list[dict]:
    """The first `n` eval records (of the eval source, or those `in_eval` holds out of `train`),
    streamed: the rest of the data is never read."""
    import itertools

    from orchestrator.data.records import in_eval

    if not n or not data.eval:
        return []
    if isinstance(data.eval, str):
        located = iter_records(resolve_source(data.eval, "data.eval"))
    else:
        located = ((w, r) for w, r in iter_records(resolve_source(data.train, "data.train"))
                   if in_eval(r, seed, data.eval))
    return [r for _, r in itertools.islice(located, n)]
