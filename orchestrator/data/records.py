"""The data's shapes (`Example`, `DataSets`) and reading JSONL records, each problem naming its
file and line."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.spec import Problem, SpecError

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class DataSets:
    train: list[Example]
    eval: list[Example]
    stats: dict[str, Any] = field(default_factory=dict)
    pad_id: int | None = None  # the tokenizer's padding token, for the workers' batches
    files_sha256: dict[str, str] = field(default_factory=dict)  # `train_sha256`, `eval_sha256`: lineage


def _data_error(path: str, message: str, fix: str) -> SpecError:
    return SpecError([Problem(path=path, message=message, fix=fix)])


def read_jsonl(path: str | Path, field_path: str = "data.train") -> list[tuple[int, dict]]:
    """(line number, record) for each record of a JSONL file: a bad line is reported with its
    file and line number, and so, later, is a record with a missing field or one too long."""
    path = Path(path)
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise _data_error(field_path, f"file not found: {path}", "point it at an existing JSONL file") from None
    except UnicodeDecodeError:
        raise _data_error(field_path, f"{path} is not UTF-8 text", "re-encode the file as UTF-8") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise _data_error(field_path, f"{path}:{number}: malformed JSON ({e.msg})",
                              "make each line one JSON object") from None
        if not isinstance(record, dict):
            raise _data_error(field_path, f"{path}:{number}: a line is not a JSON object",
                              "make each line one JSON object") from None
        records.append((number, record))
    if not records:
        raise _data_error(field_path, f"{path} has no records", "add at least one JSON line")
    return records
