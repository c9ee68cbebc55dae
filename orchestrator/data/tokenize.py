"""Data: JSONL records -> formatted text with trained character spans -> token ids and labels.

Three formats share one tokenization path. Each formatter returns the full text and the
character spans whose tokens are trained; every other token (the prompt, the user turns)
gets the label -100 and so adds nothing to the loss.
"""

from __future__ import annotations

import random

from orchestrator.data.formats import _FORMATTERS
from orchestrator.data.records import IGNORE_INDEX, DataSets, Example, _data_error, read_jsonl
from orchestrator.spec import DataSpec


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: str | None = None,
                   chat_template: str | None = None):
    """The base's tokenizer at `revision`, with `chat_template` (data.chat_template) in place of
    its own when given. Without a pad token it pads with EOS: padding is masked by position (see
    `collate`), so EOS is still trained."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def tokenize_example(text: str, spans: list[tuple[int, int]], add_eos: bool, tokenizer,
                     max_seq_len: int) -> tuple[Example, bool]:
    """Token ids and labels; tokens whose characters fall in `spans` are trained.

    Returns the example and whether it was truncated to `max_seq_len`.
    """
    # A chat template that writes the BOS token itself: the tokenizer must not add a second one.
    writes_bos = bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)
    enc = tokenizer(text, add_special_tokens=not writes_bos, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = []
    for tok, (s, e) in zip(ids, offsets):
        # A token that overlaps a span is trained: " woof" after a template's "[assistant] " starts
        # on the prompt's space but is the first token of the answer.
        trained = e > s and any(s < b and e > a for a, b in spans)
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
    if data.format == "chat" and not tokenizer.chat_template:
        raise _data_error("data.chat_template", f"the tokenizer of the base ({tokenizer.name_or_path}) has no chat "
                          "template, so chat records cannot be rendered",
                          "set data.chat_template to a Jinja template or a file holding one (an instruct "
                          "model's tokenizer_config.json has one), or use data.format alpaca or text")
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


def split_records(data: DataSpec, seed: int) -> tuple[list, list, str, str]:
    """The job's (line, record) pairs for training and for evaluation (its eval file, or the
    seeded fraction of `train` held out), with the eval records' source file and field path."""
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
    return train_records, eval_records, eval_source, eval_field


def load_datasets(data: DataSpec, tokenizer, seed: int) -> DataSets:
    """Read, split (when `eval` is a fraction), format and tokenize the job's data."""
    train_records, eval_records, eval_source, eval_field = split_records(data, seed)
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
