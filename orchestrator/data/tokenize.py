"""Data: records -> formatted text with trained character spans -> token ids and labels.

Three formats share one tokenization path. Each formatter returns the full text and the
character spans whose tokens are trained; every other token (the prompt, the user turns)
gets the label -100 and so adds nothing to the loss.
"""

from __future__ import annotations

import itertools
import json

from orchestrator.data.formats import _FORMATTERS, chat_key, chat_messages
from orchestrator.data.records import IGNORE_INDEX, DataSets, Example, _data_error, in_eval
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


def trained_mask(offsets, spans: list[tuple[int, int]]):
    """Which tokens are trained: a token (its characters `offsets[i]` = (start, end)) is trained
    when it has characters and overlaps a span. " woof" after a template's "[assistant] " starts
    on the prompt's space but is the first token of the answer. One array expression per text
    (a Python test per token and span was most of the tokenizing time)."""
    import numpy as np

    o = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    sp = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    starts, ends = o[:, :1], o[:, 1:]
    overlaps = (starts < sp[:, 1]) & (ends > sp[:, 0])  # tokens x spans
    return (o[:, 1] > o[:, 0]) & overlaps.any(axis=1)


def _labelled(ids: list[int], offsets, spans: list[tuple[int, int]], eos_id: int | None,
              max_seq_len: int) -> tuple[Example, bool]:
    """The example of one tokenized text (`eos_id`: append that token, trained, when not None)."""
    import numpy as np

    labels = np.where(trained_mask(offsets, spans), np.asarray(ids, dtype=np.int64), IGNORE_INDEX).tolist()
    if eos_id is not None:
        ids = ids + [eos_id]
        labels = labels + [eos_id]
    truncated = len(ids) > max_seq_len
    if truncated:
        # The prompt is cut before the response: up to the excess is dropped from the start, never
        # a trained token; what is still too long is then cut at the end.
        first_trained = next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), len(labels))
        start = min(len(ids) - max_seq_len, first_trained)
        ids, labels = ids[start:], labels[start:]
    return Example(input_ids=ids[:max_seq_len], labels=labels[:max_seq_len]), truncated


def tokenize_texts(texts: list[str], spans: list[list[tuple[int, int]]], add_eos: list[bool], tokenizer,
                   max_seq_len: int) -> list[tuple[Example, bool]]:
    """Token ids and labels of many texts in one call of the (fast, batched) tokenizer; tokens
    whose characters fall in a text's `spans` are trained. Each result says whether the example
    was truncated to `max_seq_len`."""
    # A chat template that writes the BOS token itself: the tokenizer must not add a second one.
    bos, eos_id = tokenizer.bos_token, tokenizer.eos_token_id  # each a lookup in the tokenizer: once
    writes_bos = [bool(bos) and t.startswith(bos) for t in texts]
    out: list = [None] * len(texts)
    for special in (True, False):
        rows = [i for i, w in enumerate(writes_bos) if w != special]
        if not rows:
            continue
        # verbose=False: no "longer than the model's maximum length" warning per batch; data.max_seq_len
        # cuts each example below (and the summary counts the truncated ones).
        enc = tokenizer([texts[i] for i in rows], add_special_tokens=special, return_offsets_mapping=True,
                        verbose=False)
        for k, i in enumerate(rows):
            out[i] = _labelled(enc["input_ids"][k], enc["offset_mapping"][k], spans[i],
                               eos_id if add_eos[i] else None, max_seq_len)
    return out


def tokenize_example(text: str, spans: list[tuple[int, int]], add_eos: bool, tokenizer,
                     max_seq_len: int) -> tuple[Example, bool]:
    """One text's example and whether it was truncated (see `tokenize_texts`)."""
    return tokenize_texts([text], [spans], [add_eos], tokenizer, max_seq_len)[0]


def check_chat_template(data: DataSpec, tokenizer) -> None:
    if data.format == "chat" and not tokenizer.chat_template:
        raise _data_error("data.chat_template", f"the tokenizer of the base ({tokenizer.name_or_path}) has no chat "
                          "template, so chat records cannot be rendered",
                          "set data.chat_template to a Jinja template or a file holding one (an instruct "
                          "model's tokenizer_config.json has one), or use data.format alpaca or text")


def _not_text(record: dict, required: tuple[str, ...], fmt: str) -> str | None:
    """What is wrong with a field that is there but holds no text (`output: null` would train the
    model to answer "None"), as "<field>: <what>"; None when nothing is. Numbers are text enough
    (written as they read); a chat's messages must be a list of objects with a role."""
    if fmt == "chat":
        messages = chat_messages(record)
        if not isinstance(messages, list) or not messages:
            return f"{chat_key(record)}: {json.dumps(messages)[:60]}"
        bad = next((m for m in messages if not isinstance(m, dict) or "role" not in m), None)
        return None if bad is None else f"a message without a role: {json.dumps(bad)[:60]}"
    for key in (*required, *(("input",) if fmt == "alpaca" else ())):
        value = record.get(key)
        if value is None and key == "input":  # no input: the prompt without one
            continue
        if value is None or isinstance(value, (bool, list, dict)):
            return f"{key}: {json.dumps(value)[:60]}"
    return None


def tokenize_records(records: list[dict], wheres: list[str], data: DataSpec, tokenizer,
                     field_path: str) -> list[tuple[Example, bool]]:
    """Format and tokenize records: (example, truncated) each, in order, examples without a
    trained token included. `wheres` name each record for problems (`file:line: the record`).
    Raises a `SpecError` for a record that lacks a field, or is too long under too_long=error."""
    formatter, required = _FORMATTERS[data.format]
    check_chat_template(data, tokenizer)
    required = required or (data.text_field,)
    formatted = []
    for where, record in zip(wheres, records):
        missing = [k for k in required if k not in record and not (k == "messages" and chat_key(record))]
        if missing:
            needs = ", ".join(required) + (" (or ShareGPT's conversations)" if data.format == "chat" else "")
            raise _data_error(field_path, f"{where} lacks {', '.join(missing)} (format '{data.format}' needs {needs})",
                              "fix the record or set data.format to the file's format")
        if (wrong := _not_text(record, required, data.format)) is not None:
            raise _data_error(field_path, f"{where} has {wrong} (format '{data.format}' needs "
                              f"{'a list of messages, each with a role' if data.format == 'chat' else 'text'} there)",
                              "fix the record or leave it out of the file")
        formatted.append(formatter(record, tokenizer, data))
    results = tokenize_texts([f[0] for f in formatted], [f[1] for f in formatted], [f[2] for f in formatted],
                             tokenizer, data.max_seq_len)
    for where, (_, cut) in zip(wheres, results):
        if cut and data.too_long == "error":
            raise _data_error(field_path, f"{where} is longer than data.max_seq_len="
                              f"{data.max_seq_len} tokens (data.too_long=error)",
                              "raise data.max_seq_len, shorten the record, or set data.too_long=truncate")
    return results


def prepare_records(records: list[dict], data: DataSpec, tokenizer, source: str,
                    field_path: str, lines: list[int] | None = None) -> tuple[list[Example], int]:
    """Format and tokenize records in memory; returns the examples with a trained token and how
    many were truncated. `lines`: each record's line in `source`, for problems to name (without
    it, its position in `records`)."""
    wheres = [f"{source}:{n}: the record" for n in lines] if lines else \
        [f"{source}: record {n}" for n in range(1, len(records) + 1)]
    results = tokenize_records(records, wheres, data, tokenizer, field_path)
    return [e for e, _ in results if e.num_trained_tokens], sum(cut for _, cut in results)


def split_records(data: DataSpec, seed: int) -> tuple[list, list, str, str]:
    """The job's (where, record) pairs for training and for evaluation (its eval source, or the
    records of `train` that `in_eval` holds out), with the eval records' source and field path.
    In memory: for small data sets and tests; training streams (`pipeline`)."""
    from orchestrator.data.sources import iter_records, resolve_source

    train_records = list(iter_records(resolve_source(data.train, "data.train")))
    eval_source, eval_field = data.train, "data.train"  # a fraction of the training file
    if isinstance(data.eval, str):
        eval_source, eval_field = data.eval, "data.eval"
        eval_records = list(iter_records(resolve_source(data.eval, "data.eval")))
    elif data.eval:
        held = [in_eval(r, seed, data.eval) for _, r in train_records]
        eval_records = [wr for wr, h in zip(train_records, held) if h]
        train_records = [wr for wr, h in zip(train_records, held) if not h]
    else:
        eval_records = []
    return train_records, eval_records, eval_source, eval_field


def load_datasets(data: DataSpec, tokenizer, seed: int) -> DataSets:
    """Read, split (when `eval` is a fraction), format and tokenize the job's data, in memory."""
    train_records, eval_records, _, eval_field = split_records(data, seed)
    train, cut_train = prepare_located(train_records, data, tokenizer, "data.train")
    evals, cut_eval = prepare_located(eval_records, data, tokenizer, eval_field)
    tokens = sum(len(e.input_ids) for e in train)
    stats = {"train_examples": len(train), "eval_examples": len(evals), "train_tokens": tokens,
             "truncated_examples": cut_train + cut_eval,
             "mean_seq_len": round(tokens / max(1, len(train)), 1)}
    return DataSets(train=train, eval=evals, stats=stats, pad_id=tokenizer.pad_token_id)


def prepare_located(located: list[tuple[str, dict]], data: DataSpec, tokenizer,
                    field_path: str) -> tuple[list[Example], int]:
    """Examples (with a trained token) of (where, record) pairs, and how many were truncated."""
    results = tokenize_records([r for _, r in located], [f"{w}: the record" for w, _ in located], data,
                               tokenizer, field_path)
    return [e for e, _ in results if e.num_trained_tokens], sum(cut for _, cut in results)


# Examples packed together: each window of this many (already shuffled) examples is packed first
# fit decreasing. On the data-at-scale benchmark's lengths (256 tokens on average, up to 512) rows
# of 512 tokens came out 97% full, against 78% packing greedily in order; padding batches of 8 to
# their longest example, 59% (8,192 examples, benchmarks/data_scale.py).
PACK_WINDOW = 256


def pack_examples(examples, max_seq_len: int, window: int = PACK_WINDOW):
    """Pack a stream of examples into rows of at most `max_seq_len` tokens: each `window` of them
    first fit decreasing (longest first, each into the first row it fits), deterministic, so a
    resumed run packs the same rows. A row keeps its examples in their stream order and the rows
    come out in the order they were opened. Each example's positions restart at 0 (the model then
    attends within each example only: transformers builds a block-diagonal causal mask from
    position ids when no attention mask is given) and its first label is masked (it would be
    predicted from the previous example)."""
    examples = iter(examples)
    while chunk := list(itertools.islice(examples, window)):
        rows: list[list[int]] = []  # indices into chunk
        room: list[int] = []
        for i in sorted(range(len(chunk)), key=lambda i: -len(chunk[i].input_ids)):
            n = len(chunk[i].input_ids)
            j = next((j for j, free in enumerate(room) if free >= n), None)
            if j is None:
                rows.append([i])
                room.append(max_seq_len - n)
            else:
                rows[j].append(i)
                room[j] -= n
        for row in rows:
            yield _packed([chunk[i] for i in sorted(row)])


def _packed(row: list[Example]) -> Example:
    ids, labels, positions = [], [], []
    for e in row:
        ids += e.input_ids
        labels += [IGNORE_INDEX] + e.labels[1:]
        positions += range(len(e.input_ids))
    return Example(input_ids=ids, labels=labels, position_ids=positions)


def collate(examples: list[Example], pad_id: int) -> dict:
    """Right-pad a batch to its longest example; padding is masked from attention and loss. A
    batch of packed rows gets position ids instead of an attention mask (padding then counts as
    one more example of its own, trained on nothing)."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    packed = examples[0].position_ids is not None
    positions = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
        if packed:
            positions[row, :n] = torch.tensor(e.position_ids)
            positions[row, n:] = torch.arange(width - n)
    if packed:
        return {"input_ids": ids, "position_ids": positions, "labels": labels}
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
