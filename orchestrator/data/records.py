"""The data's shapes (`Example`, `DataSets`) and reading JSONL records, each problem naming its
file and line."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from orchestrator.spec import Problem, SpecError

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    # A packed row (several examples in one): each example's positions restart at 0.
    position_ids: list[int] | None = None

    @property
    def num_trained_tokens(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


@dataclass
class DataSets:
    train: list[Example]
    eval: list[Example]
    stats: dict[str, Any] = field(default_factory=dict)
    pad_id: int | None = None  # the tokenizer's padding token, for the workers' batches
    files_sha256: dict[str, str] = field(default_factory=dict)  # `train_sha256`, `eval_sha256`: lineage


def _data_error(path: str, message: str, fix: str) -> SpecError:
    return SpecError([Problem(path=path, message=message, fix=fix)])


def parse_line(line: str, label: str, number: int, field_path: str) -> dict:
    """One JSONL line as a record; a line that is not a JSON object is a `SpecError` naming it."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise _data_error(field_path, f"{label}:{number}: malformed JSON ({e.msg})",
                          "make each line one JSON object") from None
    if not isinstance(record, dict):
        raise _data_error(field_path, f"{label}:{number}: a line is not a JSON object",
                          "make each line one JSON object") from None
    return record


# Compressed JSONL files, by the extension pyarrow infers the codec from (`compression="detect"`,
# as Ray Data reads them too): gzip, bzip2, zstandard, lz4 (frame).
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")


def open_jsonl(path: str | Path, filesystem=None):
    """A JSONL file as UTF-8 text, one line at a time, decompressed on the fly when its name ends
    in one of COMPRESSED_SUFFIXES (data.jsonl.gz); a local path, or a path in `filesystem`."""
    import io

    if filesystem is not None:
        return io.TextIOWrapper(filesystem.open_input_stream(str(path)), encoding="utf-8")  # detects the codec
    if not str(path).endswith(COMPRESSED_SUFFIXES):
        return open(path, encoding="utf-8")
    import pyarrow as pa

    if not Path(path).is_file():
        raise FileNotFoundError(path)
    return io.TextIOWrapper(pa.input_stream(str(path), compression="detect"), encoding="utf-8")


def scan_jsonl(path: str | Path, field_path: str = "data.train") -> Iterator[tuple[int, dict]]:
    """(line number, record) for each record of a local JSONL file (compressed or not: `open_jsonl`),
    streamed (one line in memory at a time): a bad line is reported with its file and line number,
    and so, later, is a record with a missing field or one too long. A file without records is a
    `SpecError` too."""
    path = Path(path)
    seen = False
    try:
        with open_jsonl(path) as fh:
            for number, line in enumerate(fh, start=1):
                if line.strip():
                    seen = True
                    yield number, parse_line(line, str(path), number, field_path)
    except FileNotFoundError:
        raise _data_error(field_path, f"file not found: {path}", "point it at an existing JSONL file") from None
    except UnicodeDecodeError:
        fix = ("re-encode the file as UTF-8" if not path.name.endswith(COMPRESSED_SUFFIXES) else
               f"re-encode the file as UTF-8, compressed as its name says ({', '.join(COMPRESSED_SUFFIXES)})")
        raise _data_error(field_path, f"{path} is not UTF-8 text", fix) from None
    except OSError as e:  # a compressed file that does not decompress (pyarrow's errors are OSErrors)
        if not path.name.endswith(COMPRESSED_SUFFIXES):
            raise
        raise _data_error(field_path, f"{path} cannot be decompressed ({e})",
                          "check that the file is whole and compressed as its name says") from None
    if not seen:
        raise _data_error(field_path, f"{path} has no records", "add at least one JSON line")


def read_jsonl(path: str | Path, field_path: str = "data.train") -> list[tuple[int, dict]]:
    """(line number, record) for each record of a JSONL file (all of them, in memory: for small
    files such as `orchestrator evaluate --data`); problems as `scan_jsonl` raises them."""
    return list(scan_jsonl(path, field_path))


def in_eval(record: dict, seed: int, fraction: float) -> bool:
    """Whether `data.eval: <fraction>` holds this record out for evaluation: a seeded hash of the
    record's content below `fraction`. Decided record by record, so any worker of a streamed,
    parallel pipeline decides alike, in any order; identical records land on the same side (no
    copy of an eval record is trained on)."""
    import hashlib

    text = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)
    digest = hashlib.sha256(f"{seed}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction
