"""Data: JSONL records -> formatted text with trained character spans -> token ids and labels.

Three formats share one tokenization path. Each formatter returns the full text and the
character spans whose tokens are trained; every other token (the prompt, the user turns)
gets the label -100 and so adds nothing to the loss.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.prompt_templates import format_alpaca_prompt
from orchestrator.spec import DataSpec, Problem, SpecError

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


# --- formatters: record -> (text, trained character spans) ------------------------------------


def _format_alpaca(record: dict, tokenizer, data: DataSpec) -> tuple[str, list[tuple[int, int]], bool]:
    prompt = format_alpaca_prompt(str(record["instruction"]), str(record.get("input") or ""))
    text = prompt + str(record["output"])
    return text, [(len(prompt), len(text))], True


def _format_text(record: dict, tokenizer, data: DataSpec) -> tuple[str, list[tuple[int, int]], bool]:
    text = str(record[data.text_field])
    return text, [(0, len(text))], True


def _format_chat(record: dict, tokenizer, data: DataSpec) -> tuple[str, list[tuple[int, int]], bool]:
    messages = record["messages"]
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    text = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        # The assistant turn's characters are those the template adds after the prompt for it.
        start, end = len(render(messages[:i], True)), len(render(messages[: i + 1], False))
        spans.append((start, end))
    # The chat template writes its own end-of-turn tokens, so no extra EOS is appended.
    return text, spans, False


_FORMATTERS = {"alpaca": (_format_alpaca, ("instruction", "output")),
               "text": (_format_text, None),
               "chat": (_format_chat, ("messages",))}


def tokenize_example(text: str, spans: list[tuple[int, int]], add_eos: bool, tokenizer,
                     max_seq_len: int) -> tuple[Example, bool]:
    """Token ids and labels; tokens whose characters fall in `spans` are trained.

    Returns the example and whether it was truncated to `max_seq_len`.
    """
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = []
    for tok, (s, e) in zip(ids, offsets):
        trained = e > s and any(a <= s < b for a, b in spans)
        labels.append(tok if trained else IGNORE_INDEX)
    if add_eos and tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
        labels = labels + [tokenizer.eos_token_id]
    truncated = len(ids) > max_seq_len
    return Example(input_ids=ids[:max_seq_len], labels=labels[:max_seq_len]), truncated


def prepare_records(records: list[dict], data: DataSpec, tokenizer, source: str,
                    field_path: str, lines: list[int] | None = None) -> tuple[list[Example], int]:
    """Format and tokenize records; returns examples and how many were truncated. `lines`: each
    record's line in `source`, for problems to name (without it, its position in `records`)."""
    formatter, required = _FORMATTERS[data.format]
    required = required or (data.text_field,)
    examples, truncated = [], 0
    for number, record in enumerate(records, start=1):
        where = f"{source}:{lines[number - 1]}: the record" if lines else f"{source}: record {number}"
        missing = [k for k in required if k not in record]
        if missing:
            raise _data_error(field_path, f"{where} lacks {', '.join(missing)} "
                              f"(format '{data.format}' needs {', '.join(required)})",
                              "fix the record or set data.format to the file's format")
        text, spans, add_eos = formatter(record, tokenizer, data)
        example, cut = tokenize_example(text, spans, add_eos, tokenizer, data.max_seq_len)
        if cut and data.too_long == "error":
            raise _data_error(field_path, f"{where} is longer than data.max_seq_len="
                              f"{data.max_seq_len} tokens (data.too_long=error)",
                              "raise data.max_seq_len, shorten the record, or set data.too_long=truncate")
        truncated += cut
        if example.num_trained_tokens:
            examples.append(example)
    return examples, truncated


def load_datasets(data: DataSpec, tokenizer, seed: int) -> DataSets:
    """Read, split (when `eval` is a fraction), format and tokenize the job's data."""
    train_records = read_jsonl(data.train, "data.train")
    eval_source, eval_field = data.train, "data.train"  # a fraction of the training file
    if isinstance(data.eval, str):
        eval_source, eval_field = data.eval, "data.eval"
        eval_records = read_jsonl(data.eval, "data.eval")
    elif data.eval:
        shuffled = list(train_records)
        random.Random(seed).shuffle(shuffled)
        n_eval = max(1, int(round(len(shuffled) * data.eval)))
        eval_records, train_records = shuffled[:n_eval], shuffled[n_eval:]
    else:
        eval_records = []
    train, cut_train = _prepare_numbered(train_records, data, tokenizer, data.train, "data.train")
    evals, cut_eval = _prepare_numbered(eval_records, data, tokenizer, eval_source, eval_field)
    tokens = sum(len(e.input_ids) for e in train)
    stats = {"train_examples": len(train), "eval_examples": len(evals), "train_tokens": tokens,
             "truncated_examples": cut_train + cut_eval,
             "mean_seq_len": round(tokens / max(1, len(train)), 1)}
    return DataSets(train=train, eval=evals, stats=stats, pad_id=tokenizer.pad_token_id)


def _prepare_numbered(numbered: list[tuple[int, dict]], data: DataSpec, tokenizer, source: str,
                      field_path: str) -> tuple[list[Example], int]:
    return prepare_records([r for _, r in numbered], data, tokenizer, source, field_path,
                           lines=[n for n, _ in numbered])


def collate(examples: list[Example], pad_id: int) -> dict:
    """Right-pad a batch to its longest example; padding is masked from attention and loss."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --- tokenized data sets, cached across runs of a job ----------------------------------------------

# What formats and tokenizes records: changing either file changes every cache key.
_CODE = (Path(__file__), Path(__file__).with_name("prompt_templates.py"))
# A base's weight files: large, and not the tokenizer's, so left out of the cache key.
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz"}
CACHE_KEEP = 16  # the most recently used data sets the cache keeps


def file_sha256(path: str | Path) -> str:
    import hashlib

    from orchestrator.base_model import hash_file

    digest = hashlib.sha256()
    hash_file(digest, path)
    return digest.hexdigest()


def data_files_sha256(data: DataSpec) -> dict[str, str]:
    """sha256 of each data file the job names: `train_sha256`, and `eval_sha256` for an eval file.
    Raises OSError when a file cannot be read."""
    return {f"{name}_sha256": file_sha256(path) for name in ("train", "eval")
            if isinstance(path := getattr(data, name), str)}


def tokenized_cache_key(data: DataSpec, seed: int, base_path: str, files_sha256: dict[str, str],
                        trust_remote_code: bool = False) -> str:
    """sha256 of everything the tokenized data sets depend on: the spec's data section, the seed
    (it splits off an eval fraction), the data files (`files_sha256`), the base's files other than
    weights (the tokenizer, its chat template), the code that formats and tokenizes, and the
    transformers and tokenizers versions. Raises OSError when a file cannot be read."""
    import hashlib
    from importlib.metadata import version

    from orchestrator.base_model import hash_file

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
                     cache_dir: Path | None = None) -> tuple[DataSets, Path | None]:
    """The job's tokenized data sets (with the data files' sha256), and the cache file they came
    from (None when they were tokenized now). A job run again with the same data, base and
    settings skips loading the tokenizer (and importing transformers) and tokenizing; problems with
    the data are raised as `load_datasets` raises them (only data that tokenized without one is
    cached)."""
    import contextlib

    from orchestrator.builtin_models import cache_root

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
    from orchestrator.base_model import load_tokenizer

    datasets = load_datasets(data, load_tokenizer(base_path, trust_remote_code), seed)
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
