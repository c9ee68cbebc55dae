"""Data formatting and loss masking: only the response (or assistant turns) is trained."""

import functools
import json
from pathlib import Path

import pytest

from orchestrator.data.formats import format_alpaca_prompt
from orchestrator.data.records import IGNORE_INDEX, read_jsonl
from orchestrator.data.tokenize import collate, load_datasets, prepare_records
from orchestrator.spec import DataSpec, SpecError


def trained_text(tokenizer, example) -> str:
    ids = [t for t, l in zip(example.input_ids, example.labels) if l != IGNORE_INDEX]
    return tokenizer.decode(ids, skip_special_tokens=False)


def prompt_text(tokenizer, example) -> str:
    ids = [t for t, l in zip(example.input_ids, example.labels) if l == IGNORE_INDEX]
    return tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("record", [
    {"instruction": "Name the animal.", "input": "A small grey mouse.", "output": "mouse"},
    {"instruction": "Count to three.", "input": "", "output": "one two three"},
])
def test_alpaca_trains_response_and_eos_only(tokenizer, record):
    [ex], cut = prepare_records([record], DataSpec(train="x", format="alpaca"), tokenizer, "t", "data.train")
    assert cut == 0
    assert trained_text(tokenizer, ex) == record["output"] + tokenizer.eos_token
    assert prompt_text(tokenizer, ex) == format_alpaca_prompt(record["instruction"], record["input"])
    assert len(ex.input_ids) == len(ex.labels)


def test_chat_trains_assistant_turns_only(tokenizer):
    record = {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "What does the dog say?"},
                           {"role": "assistant", "content": "woof"},
                           {"role": "user", "content": "And the cat?"},
                           {"role": "assistant", "content": "meow"}]}
    [ex], _ = prepare_records([record], DataSpec(train="x", format="chat"), tokenizer, "t", "data.train")
    trained = trained_text(tokenizer, ex)
    assert "woof" in trained and "meow" in trained
    for masked in ("Be brief.", "What does the dog say?", "And the cat?"):
        assert masked not in trained
    # The assistant turns end with the template's end-of-turn token, which is trained too.
    assert trained.count(tokenizer.eos_token) == 2


def test_sharegpt_records_train_as_their_messages(tokenizer):
    """A ShareGPT record (conversations of from/value turns, its system prompt beside them) gives
    the example of the same conversation written as messages, and the same prompt and reference."""
    from orchestrator.data.formats import prompt_and_reference
    from orchestrator.evaluation.evaluate import detect_format

    messages = {"messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "What does the dog say?"},
                             {"role": "assistant", "content": "woof"},
                             {"role": "user", "content": "And the cat?"},
                             {"role": "assistant", "content": "meow"}]}
    sharegpt = {"system": "Be brief.", "conversations": [
        {"from": "human", "value": "What does the dog say?"}, {"from": "gpt", "value": "woof"},
        {"from": "human", "value": "And the cat?"}, {"from": "gpt", "value": "meow"}]}
    spec = DataSpec(train="x", format="chat")
    [[a], [b]] = [prepare_records([r], spec, tokenizer, "t", "data.train")[0] for r in (messages, sharegpt)]
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels) and "meow" in trained_text(tokenizer, b)
    assert prompt_and_reference(sharegpt, "chat", tokenizer) == prompt_and_reference(messages, "chat", tokenizer)
    assert detect_format(sharegpt, DataSpec(train="x")) == "chat"  # `evaluate --data` of a ShareGPT file


CHAT = {"messages": [{"role": "user", "content": "What does the dog say?"},
                     {"role": "assistant", "content": "woof"}]}
# A template of another family's kind (Zephyr-like), written as a Jinja string in the job.
OTHER_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] + eos_token }}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}")


@pytest.fixture
def plain_tokenizer(tiny_base):
    """The tiny base's tokenizer as a base model's often is: no chat template, pad = eos."""
    from orchestrator.data.tokenize import load_tokenizer

    tok = load_tokenizer(str(tiny_base))
    tok.chat_template = None
    tok.pad_token = tok.eos_token
    return tok


@pytest.mark.parametrize("offsets, spans, expected", [
    # BOS (no characters), "[user]", " hi", " [assistant]", " wo", "of", EOS-like token with no characters
    ([(0, 0), (0, 6), (6, 9), (9, 21), (21, 24), (24, 26), (26, 26)], [(22, 26)],
     [False, False, False, False, True, True, False]),  # " wo" starts on the prompt's space: trained
    ([(0, 3), (3, 6), (6, 9)], [(3, 6)], [False, True, False]),  # touching a span's edge is not overlapping it
    ([(0, 3), (3, 6), (6, 9), (9, 12)], [(0, 2), (7, 12)], [True, False, True, True]),  # several spans
    ([(0, 3), (3, 6)], [], [False, False]),  # nothing to train
    ([(0, 3), (3, 3), (3, 6)], [(0, 6)], [True, False, True]),  # no characters (a special token): never trained
    ([], [(0, 5)], []),
])
def test_a_token_is_trained_when_it_has_characters_in_a_span(offsets, spans, expected):
    from orchestrator.data.tokenize import trained_mask

    assert trained_mask(offsets, spans).tolist() == expected


def test_chat_without_a_template_is_a_clean_error(plain_tokenizer):
    with pytest.raises(SpecError, match=r"data.chat_template: the tokenizer of the base .* has no chat template.*"
                                        r"Fix: set data.chat_template"):
        prepare_records([CHAT], DataSpec(train="x", format="chat"), plain_tokenizer, "t", "data.train")


@pytest.mark.parametrize("template", [None, OTHER_TEMPLATE])
def test_chat_template_writes_the_only_bos_and_eos_is_trained_where_pad_is_eos(tiny_base, template):
    """The tokenizer's own template and one named in the job both write bos_token: one BOS id per
    example, not two; with pad == eos, the EOS ending the assistant turn is still trained, also
    after padding in a batch."""
    from orchestrator.data.tokenize import load_tokenizer

    tok = load_tokenizer(str(tiny_base), chat_template=template)
    tok.pad_token = tok.eos_token
    data = DataSpec(train="x", format="chat", chat_template=template)
    [ex], _ = prepare_records([CHAT], data, tok, "t", "data.train")
    assert ex.input_ids.count(tok.bos_token_id) == 1 and ex.input_ids[0] == tok.bos_token_id
    assert trained_text(tok, ex).lstrip().startswith("woof" + tok.eos_token)
    if template:
        assert tok.decode(ex.input_ids[1:]).startswith("[user] What does the dog say?")
    [short], _ = prepare_records([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "yo"}]}],
                                 data, tok, "t", "data.train")
    batch = collate([short, ex], tok.pad_token_id)
    n, eos_at = len(short.input_ids), short.labels.index(tok.eos_token_id)
    assert batch["input_ids"][0, n] == tok.eos_token_id  # padded with the EOS id...
    assert batch["labels"][0, eos_at] == tok.eos_token_id and (batch["labels"][0, n:] == IGNORE_INDEX).all()


def test_chat_template_file_is_read_into_the_spec(tmp_path):
    from orchestrator.spec import load_spec

    from conftest import REPO

    (tmp_path / "chat.jinja").write_text(OTHER_TEMPLATE)
    spec = load_spec(REPO / "jobs" / "quickstart.yaml", ["data.format=chat", f"data.chat_template={tmp_path}/chat.jinja"])
    assert spec.data.chat_template == OTHER_TEMPLATE
    with pytest.raises(SpecError, match=r"data.chat_template: file not found: nope.jinja"):
        load_spec(REPO / "jobs" / "quickstart.yaml", ["data.chat_template=nope.jinja"])


def test_text_trains_everything_but_special_prefix(tokenizer):
    [ex], _ = prepare_records([{"text": "the dog runs to the park."}], DataSpec(train="x", format="text"),
                              tokenizer, "t", "data.train")
    assert trained_text(tokenizer, ex) == "the dog runs to the park." + tokenizer.eos_token


def test_truncation_is_counted(tokenizer):
    records = [{"text": "the dog runs to the park. " * 40}, {"text": "a cat."}]
    examples, cut = prepare_records(records, DataSpec(train="x", format="text", max_seq_len=16),
                                    tokenizer, "t", "data.train")
    assert cut == 1
    assert max(len(e.input_ids) for e in examples) == 16


def test_a_long_prompt_is_cut_before_the_response(tokenizer):
    record = {"instruction": "Describe it. " + "very " * 40 + "long.", "input": "", "output": "a cat"}
    [ex], cut = prepare_records([record], DataSpec(train="x", format="alpaca", max_seq_len=24), tokenizer, "t",
                                "data.train")
    assert cut == 1 and len(ex.input_ids) == 24
    assert trained_text(tokenizer, ex) == "a cat" + tokenizer.eos_token  # the response survives whole
    assert prompt_text(tokenizer, ex).endswith("### Response:\n") and "Describe" not in prompt_text(tokenizer, ex)


def test_eval_fraction_split_is_deterministic_and_disjoint(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"record number {i}."}) + "\n" for i in range(50)))
    spec = DataSpec(train=str(path), eval=0.2, format="text")
    a, b = load_datasets(spec, tokenizer, seed=1), load_datasets(spec, tokenizer, seed=1)
    # Each record is held out by a seeded hash of its content: about 20%, decided record by record.
    assert len(a.train) + len(a.eval) == 50 and 4 <= len(a.eval) <= 17
    assert [e.input_ids for e in a.eval] == [e.input_ids for e in b.eval]
    assert not {tuple(e.input_ids) for e in a.eval} & {tuple(e.input_ids) for e in a.train}
    assert a.stats["train_examples"] == len(a.train) and a.stats["truncated_examples"] == 0
    other = load_datasets(spec, tokenizer, seed=2)
    assert [e.input_ids for e in other.eval] != [e.input_ids for e in a.eval]


@pytest.mark.parametrize("content,expected", [
    ('{"text": "ok"}\n{not json}\n', "d.jsonl:2: malformed JSON"),
    ('["a list"]\n', "d.jsonl:1: a line is not a JSON object"),
    ("\n\n", "has no records"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, expected):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(SpecError) as exc:
        read_jsonl(path)
    assert expected in str(exc.value.problems[0])


@pytest.mark.parametrize("name,content,expected", [
    ("d.jsonl.gz", b"plain text, not gzip\n", "d.jsonl.gz cannot be decompressed"),
    ("d.jsonl", b"\x1f\x8b\x08\x00 gzip bytes under a plain name", "d.jsonl is not UTF-8 text"),
    ("d.jsonl.zst", None, "file not found"),
])
def test_a_compressed_file_that_does_not_read_is_named(tmp_path, name, content, expected):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SpecError) as exc:
        read_jsonl(path)
    assert expected in str(exc.value.problems[0]) and exc.value.problems[0].path == "data.train"


def test_compressed_jsonl_gives_the_examples_of_the_plain_file(tmp_path, tiny_base, ray_local):
    """gzip, zstd and bzip2 JSONL files (by extension) read as the plain JSONL they hold: on the
    driver and by Ray Data (large sources), the same examples in the same order."""
    import pyarrow as pa

    from orchestrator.data.cache import prepare_datasets

    records = [{"instruction": f"Repeat {i}.", "input": "", "output": f"word {i} " * (i % 4 + 1)} for i in range(30)]
    text = "".join(json.dumps(r) + "\n" for r in records).encode()
    (tmp_path / "plain").mkdir()
    (tmp_path / "packed").mkdir()
    for part, codec in enumerate(("gzip", "zstd", "bz2")):
        chunk = "".join(json.dumps(r) + "\n" for r in records[part * 10:(part + 1) * 10]).encode()
        (tmp_path / "plain" / f"part-{part}.jsonl").write_bytes(chunk)
        suffix = {"gzip": ".gz", "zstd": ".zst", "bz2": ".bz2"}[codec]
        with pa.output_stream(str(tmp_path / "packed" / f"part-{part}.jsonl{suffix}"), compression=codec) as out:
            out.write(chunk)
    assert sum(f.stat().st_size for f in (tmp_path / "packed").iterdir()) < len(text)  # really compressed
    results = []
    for source, use_ray in ((tmp_path / "plain", False), (tmp_path / "packed", False), (tmp_path / "packed", True)):
        spec = DataSpec(train=str(source), format="alpaca", eval=0.2)
        tokenized, _ = prepare_datasets(spec, 7, str(tiny_base), cache_dir=tmp_path / f"cache-{use_ray}",
                                        use_ray=use_ray)
        results.append([(e.input_ids, e.labels) for split in ("train", "eval") for e in tokenized.examples(split)])
    assert results[0] == results[1] == results[2] and len(results[0]) == 30


@pytest.mark.parametrize("codec", ["gzip", "bz2", "parquet"])
def test_a_source_is_large_by_the_data_it_holds_not_its_file_size(tmp_path, codec):
    """Where a source is tokenized (the driver, or Ray Data over `DRIVER_MAX_BYTES`) goes by the data
    it holds: a 20 MiB JSONL compressed (or Parquet written) to far less than 16 MiB is large; the
    same records, 2 MiB of them, are not."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.data import pipeline
    from orchestrator.data.sources import resolve_source, source_bytes

    record = json.dumps({"instruction": "Describe the animal.", "input": "A brown owl {:07d}.",
                         "output": "It is an owl. " * 20})
    for name, mib in (("big", 20), ("small", 2)):
        lines = [record.replace("{:07d}", f"{i:07d}") for i in range(mib * 2**20 // (len(record) + 1) + 1)]
        if codec == "parquet":
            path = tmp_path / f"{name}.parquet"
            pq.write_table(pa.table({"text": lines}), path, compression="zstd")
        else:
            path = tmp_path / f"{name}.jsonl{'.gz' if codec == 'gzip' else '.bz2'}"
            with pa.output_stream(str(path), compression=codec) as out:
                out.write("".join(line + "\n" for line in lines).encode())
        source = resolve_source(str(path), "data.train")
        assert path.stat().st_size < pipeline.DRIVER_MAX_BYTES // 8, path.stat().st_size  # the file is small
        assert pipeline.is_large(source) is (name == "big"), (name, source_bytes(source))
        if codec != "parquet":  # the whole text, when no limit stops the count
            assert source_bytes(source) == sum(len(line) + 1 for line in lines)


def test_a_parquet_source_counts_a_repeated_value_in_every_row(tmp_path):
    """Parquet stores a value repeated in every row once (a dictionary page), and its metadata
    counts it once; the data set decodes it in each. 20 MiB of rows that all carry one 4 KiB
    system prompt is large, though its file and its metadata's size are a few KiB; 2 MiB of the
    same is not."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.data import pipeline
    from orchestrator.data.sources import resolve_source, source_bytes

    system = "You are a careful assistant. " * 140  # about 4 KiB
    for name, mib in (("big", 20), ("small", 2)):
        rows = mib * 2**20 // len(system) + 1
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"system": [system] * rows, "text": [f"row {i}" for i in range(rows)]}), path,
                       compression="zstd")
        meta = pq.ParquetFile(path).metadata
        stored = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        assert max(stored, path.stat().st_size) < pipeline.DRIVER_MAX_BYTES // 64, (stored, path.stat().st_size)
        source = resolve_source(str(path), "data.train")
        assert pipeline.is_large(source) is (name == "big"), (name, source_bytes(source))
        assert source_bytes(source) >= rows * len(system)  # every row's copy counted


def test_missing_fields_are_named(tokenizer):
    with pytest.raises(SpecError) as exc:
        prepare_records([{"instruction": "x"}], DataSpec(train="x", format="alpaca"), tokenizer, "f.jsonl", "data.train")
    assert "record 1 lacks output" in str(exc.value.problems[0])


@pytest.mark.parametrize("fmt,record,expected", [
    ("alpaca", {"instruction": "x", "output": None}, "record 1 has output: null (format 'alpaca' needs text there)"),
    ("alpaca", {"instruction": ["x"], "output": "y"}, 'record 1 has instruction: ["x"]'),
    ("alpaca", {"instruction": "x", "input": {"a": 1}, "output": "y"}, 'record 1 has input: {"a": 1}'),
    ("text", {"text": True}, "record 1 has text: true (format 'text' needs text there)"),
    ("chat", {"messages": []}, "record 1 has messages: [] (format 'chat' needs a list of messages, each with a role"),
    ("chat", {"messages": [{"content": "hi"}]}, 'record 1 has a message without a role: {"content": "hi"}'),
    ("chat", {"conversations": "hi"}, 'record 1 has conversations: "hi"'),
    ("chat", {"conversations": [{"value": "hi"}]}, 'record 1 has a message without a role: {"value": "hi"}'),
    ("chat", {"turns": []}, "record 1 lacks messages (format 'chat' needs messages (or ShareGPT's conversations))"),
])
def test_a_field_without_text_is_named(tokenizer, fmt, record, expected):
    """A field that is there but holds no text is a problem, not the text "None" to train on."""
    with pytest.raises(SpecError) as exc:
        prepare_records([record], DataSpec(train="x", format=fmt), tokenizer, "f.jsonl", "data.train")
    assert expected in str(exc.value.problems[0])


def test_numbers_and_a_null_input_are_text_enough(tokenizer):
    examples, _ = prepare_records([{"instruction": "Add 2 and 3.", "input": None, "output": 5}],
                                  DataSpec(train="x", format="alpaca"), tokenizer, "f.jsonl", "data.train")
    assert tokenizer.decode(examples[0].input_ids).count("5") >= 1 and examples[0].num_trained_tokens > 0


@pytest.mark.parametrize("seed", range(4))
def test_a_bad_record_is_named_by_its_line_in_the_file_whichever_split_it_lands_in(tmp_path, tokenizer, seed):
    good = json.dumps({"instruction": "Name it.", "input": "", "output": "a cat"})
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([good, good, "", good, json.dumps({"instruction": "x"}), good, good]) + "\n")
    with pytest.raises(SpecError) as exc:
        load_datasets(DataSpec(train=str(path), format="alpaca", eval=0.5), tokenizer, seed=seed)
    [problem] = exc.value.problems
    assert problem.path == "data.train"
    assert f"{path}:5: the record lacks output" in str(problem)


def test_collate_pads_and_masks(tokenizer):
    examples, _ = prepare_records([{"text": "a cat."}, {"text": "the small dog runs to the park."}],
                                  DataSpec(train="x", format="text"), tokenizer, "t", "data.train")
    batch = collate(examples, tokenizer.pad_token_id)
    short = len(examples[0].input_ids)
    assert batch["input_ids"].shape[0] == 2
    assert batch["attention_mask"][0, short:].sum() == 0
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, short:] == tokenizer.pad_token_id).all()


def test_tokenized_data_is_cached_by_what_it_depends_on(tmp_path, tiny_base, monkeypatch):
    """A second preparation of the same data comes from the cache, identical and without loading
    the tokenizer; changing the data file or a data setting tokenizes again."""
    import orchestrator.data.tokenize as tokenizing
    from orchestrator.data.cache import prepare_datasets
    from orchestrator.data.files import file_sha256

    path = tmp_path / "train.jsonl"
    records = [{"instruction": f"Repeat {i}.", "input": "", "output": f"word {i}"} for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    spec, cache = DataSpec(train=str(path), format="alpaca", eval=0.5), tmp_path / "cache"
    entries = lambda: [d for d in cache.iterdir() if d.is_dir() and not d.name.startswith(".")]  # noqa: E731

    first, hit = prepare_datasets(spec, 3, str(tiny_base), cache_dir=cache)
    assert hit is None and len(entries()) == 1
    real_loader = tokenizing.load_tokenizer

    def no_tokenizer(*args, **kwargs):
        raise AssertionError("a cached data set loads no tokenizer")

    monkeypatch.setattr(tokenizing, "load_tokenizer", no_tokenizer)
    again, hit = prepare_datasets(spec, 3, str(tiny_base), cache_dir=cache)
    assert hit is not None and again == first and first.pad_id is not None
    assert first.files_sha256 == {"train_sha256": file_sha256(path)}  # for lineage, read once
    # Packing happens as the workers read: the same tokenized rows serve a packed run.
    packed, hit = prepare_datasets(spec.model_copy(update={"packing": True}), 3, str(tiny_base), cache_dir=cache)
    assert hit is not None and packed.path == first.path

    monkeypatch.setattr(tokenizing, "load_tokenizer", real_loader)
    for changed_spec, seed in [(spec.model_copy(update={"max_seq_len": 8}), 3), (spec, 4)]:
        other, hit = prepare_datasets(changed_spec, seed, str(tiny_base), cache_dir=cache)
        assert hit is None
    assert max(len(e.input_ids) for e in other.examples("train")) > 8  # the seed-4 split, at the full length
    with path.open("a") as f:
        f.write(json.dumps({"instruction": "Repeat 6.", "input": "", "output": "word 6"}) + "\n")
    # What a run on this machine stopped while tokenizing left (its process gone) goes; a live
    # process's stays, and so does another machine's (a cache on a shared disk).
    from orchestrator.data.cache import _work_prefix

    left = [_work_prefix(999_999_999) + "x", _work_prefix() + "y", ".tokenizing-999999999@elsewhere-z"]
    for name in left:
        (cache / name / "train").mkdir(parents=True)
    grown, hit = prepare_datasets(spec, 3, str(tiny_base), cache_dir=cache)
    assert hit is None and grown.stats["train_examples"] + grown.stats["eval_examples"] == 7
    assert len(entries()) == 4
    assert sorted(d.name for d in cache.iterdir() if d.name.startswith(".")) == sorted(left[1:])


QUICKSTART = {"train": "jobs/data/quickstart/train.jsonl", "eval": "jobs/data/quickstart/eval.jsonl"}


def _assert_same_examples(tokenized, reference) -> None:
    for split in ("train", "eval"):
        got = [(e.input_ids, e.labels) for e in tokenized.examples(split)]
        assert got == [(e.input_ids, e.labels) for e in getattr(reference, split)], split
    assert {k: v for k, v in tokenized.stats.items() if k != "dropped_examples"} == reference.stats


def test_ray_data_pipeline_equals_in_memory_tokenization_on_the_quickstart_data(tmp_path, tiny_base, tokenizer,
                                                                                ray_local):
    """Ray Data reads, formats and tokenizes (map_batches) into the Parquet cache: the same token
    ids and labels, in the same order, as `prepare_records` in memory."""
    from conftest import REPO

    from orchestrator.data.cache import prepare_datasets

    spec = DataSpec(**{k: str(REPO / v) for k, v in QUICKSTART.items()}, format="alpaca", max_seq_len=128)
    tokenized, _ = prepare_datasets(spec, 42, str(tiny_base), cache_dir=tmp_path, use_ray=True)
    assert all(f.endswith(".parquet") for f in tokenized.files("train"))
    _assert_same_examples(tokenized, load_datasets(spec, tokenizer, seed=42))


def test_a_pass_started_early_streams_the_same_examples_as_a_plain_one(tmp_path, tiny_base):
    """The worker's training pass starts reading in a thread while the model loads
    (`dataset_examples(..., start_now=True)`): its first pass and every later one give the same
    examples in the same order as a pass started when asked (over the Parquet cache)."""
    from conftest import REPO

    from orchestrator.data.cache import prepare_datasets
    from orchestrator.training.steps import dataset_examples

    spec = DataSpec(**{k: str(REPO / v) for k, v in QUICKSTART.items()}, format="alpaca", max_seq_len=128)
    tokenized, _ = prepare_datasets(spec, 42, str(tiny_base), cache_dir=tmp_path)
    train = functools.partial(tokenized.row_batches, "train")
    plain = [(e.input_ids, e.labels) for e in dataset_examples(train, eval_rows=False)()]
    early = dataset_examples(train, eval_rows=False, start_now=True)
    assert len(plain) > 1024  # more than the one batch of rows the thread reads ahead
    assert [(e.input_ids, e.labels) for e in early()] == plain
    assert [(e.input_ids, e.labels) for e in early()] == plain  # later passes start when asked


def test_readers_follow_the_parts_while_they_are_written(tmp_path, tiny_base):
    """Data still being written (`complete` False) is read part by part as each appears whole:
    the first rows come while the writer is held before its second table, all rows come in
    order, and the reading ends at the split's `_done`."""
    import threading

    from conftest import REPO

    from orchestrator.data.cache import prepare_datasets
    from orchestrator.data.pipeline import BATCH_RECORDS, TokenizedData, write_parts

    spec = DataSpec(**{k: str(REPO / v) for k, v in QUICKSTART.items()}, format="alpaca", max_seq_len=128)
    done, _ = prepare_datasets(spec, 42, str(tiny_base), cache_dir=tmp_path / "cache")
    import pyarrow.dataset as pads

    table = pads.dataset(done.files("train"), format="parquet").to_table()
    assert table.num_rows > BATCH_RECORDS
    held, released = threading.Event(), threading.Event()

    def tables():
        yield table.slice(0, BATCH_RECORDS)  # part 0 (BATCH_RECORDS rows) closes here
        held.set()
        assert released.wait(60)
        yield table.slice(BATCH_RECORDS)

    (tmp_path / "out" / "train").mkdir(parents=True)
    writer = threading.Thread(target=write_parts, args=(tables(), tmp_path / "out" / "train"))
    writer.start()
    growing = TokenizedData(path=str(tmp_path / "out"), stats={}, pad_id=done.pad_id, complete=False)
    assert growing.train_examples is None
    rows = growing.row_batches("train", batch_size=256)
    first = [next(rows) for _ in range(BATCH_RECORDS // 256)]
    assert held.is_set() and not released.is_set()  # read before the writer went on
    assert not (tmp_path / "out" / "train" / "_done").exists()
    released.set()
    rest = list(rows)
    writer.join()
    got = [ids for batch in first + rest for ids in batch["input_ids"]]
    assert got == table.column("input_ids").to_pylist()


def test_a_problem_met_while_tokenizing_stops_the_readers_with_it(tmp_path, tiny_base):
    """A bad record after the first part, tokenized in the background: readers get the rows
    written before it, then the problem; `wait()` raises it, and nothing is cached."""
    from conftest import REPO

    from orchestrator.data.cache import start_tokenizing
    from orchestrator.data.pipeline import BATCH_RECORDS

    lines = (REPO / QUICKSTART["train"]).read_text().splitlines()
    source = tmp_path / "train.jsonl"
    source.write_text("\n".join(lines[:BATCH_RECORDS + 100] + ["{not json"]) + "\n")
    cache = tmp_path / "cache"
    job = start_tokenizing(DataSpec(train=str(source), eval=None), 0, str(tiny_base), cache_dir=cache, use_ray=False)
    read = 0
    where = f"{source}:{BATCH_RECORDS + 101}: malformed JSON"
    with pytest.raises(RuntimeError, match=f"(?s)tokenizing the data failed: .*{where}"):
        for batch in job.data.row_batches("train"):
            read += len(batch["input_ids"])
    assert read == BATCH_RECORDS
    with pytest.raises(SpecError, match=where):
        job.wait()
    assert job.close() is None and list(cache.iterdir()) == []


def test_a_run_that_ends_first_stops_its_tokenizing_and_caches_nothing(tmp_path, tiny_base):
    """`close()` while tokenizing runs (the run failed, or its checks did): the writer stops at
    its next table and its files are removed; a reader then stops too."""
    from conftest import REPO

    from orchestrator.data.cache import start_tokenizing
    from orchestrator.data.pipeline import Stopped

    lines = (REPO / QUICKSTART["train"]).read_text().splitlines()
    source = tmp_path / "train.jsonl"
    source.write_text("\n".join(lines * 20) + "\n")  # 40,000 records: seconds of tokenizing
    cache = tmp_path / "cache"
    job = start_tokenizing(DataSpec(train=str(source), eval=None), 0, str(tiny_base), cache_dir=cache, use_ray=False)
    rows = job.data.row_batches("train")
    assert len(next(rows)["input_ids"]) > 0
    assert job.close() is None  # still running: it stops at its next table
    with pytest.raises(Stopped):
        job.wait()
    assert job.records < len(lines) * 20
    assert list(cache.iterdir()) == []
    with pytest.raises(RuntimeError, match="tokenizing the data failed: tokenizing was stopped|was removed"):
        list(rows)


def test_data_shared_with_other_nodes_is_read_from_a_bucket(tmp_path, tiny_base, monkeypatch):
    """A job whose workers may run on other nodes reads its tokenized data from shared storage
    (`cache.shared`): copied once into a bucket on a real S3 server (moto's, on 127.0.0.1), or a
    mounted directory, and read back there row for row; a second job finds the copy and copies
    nothing."""
    import shutil

    import boto3
    from conftest import REPO
    from moto.server import ThreadedMotoServer

    from orchestrator.data.cache import prepare_datasets, shared

    spec = DataSpec(**{k: str(REPO / v) for k, v in QUICKSTART.items()}, format="alpaca", max_seq_len=128)
    tokenized, _ = prepare_datasets(spec, 42, str(tiny_base), cache_dir=tmp_path / "cache")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        endpoint = "http://%s:%d" % server.get_host_and_port()
        for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                           "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        boto3.client("s3").create_bucket(Bucket="shared")
        remote = shared(tokenized, "s3://shared/runs/")
        assert remote.path == f"s3://shared/runs/tokenized/{Path(tokenized.path).name}"
        assert remote.files("train") and all(f.startswith("shared/runs/tokenized/") for f in remote.files("train"))
        for split in ("train", "eval"):
            got = [(e.input_ids, e.labels) for e in remote.examples(split)]
            assert got and got == [(e.input_ids, e.labels) for e in tokenized.examples(split)]
        mounted = shared(tokenized, str(tmp_path / "mounted"))  # storage every node mounts (storage.shared)
        assert [e.input_ids for e in mounted.examples("train")] == [e.input_ids for e in tokenized.examples("train")]
        shutil.rmtree(Path(tokenized.path) / "train")  # a copy that read this again would fail
        assert shared(tokenized, "s3://shared/runs") == remote
        assert shared(remote, "s3://elsewhere") is remote  # already where every node reads it
    finally:
        server.stop()


def test_parquet_directories_and_globs_are_sources(tmp_path, tiny_base, tokenizer):
    """A directory of Parquet files and a glob of JSONL files give the examples of the same records."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.data.cache import prepare_datasets

    records = [{"instruction": f"Repeat {i}.", "input": "", "output": f"word {i} " * (i % 4 + 1)} for i in range(40)]
    (tmp_path / "pq").mkdir()
    (tmp_path / "js").mkdir()
    for part in range(2):
        chunk = records[part * 20:(part + 1) * 20]
        pq.write_table(pa.Table.from_pylist(chunk), tmp_path / "pq" / f"part-{part}.parquet")
        (tmp_path / "js" / f"part-{part}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chunk))
    results = []
    for source in (str(tmp_path / "pq"), str(tmp_path / "js" / "*.jsonl")):
        spec = DataSpec(train=source, format="alpaca", eval=0.25)
        tokenized, _ = prepare_datasets(spec, 7, str(tiny_base), cache_dir=tmp_path / "cache")
        results.append([(e.input_ids, e.labels) for split in ("train", "eval") for e in tokenized.examples(split)])
        assert tokenized.stats["eval_examples"] > 0 and len(tokenized.files_sha256["train_sha256"]) == 64
    assert results[0] == results[1] and len(results[0]) == 40


def hold_the_driver(monkeypatch, batch: int, until) -> list[bool]:
    """Make the driver's tokenizing wait, before it tokenizes batch `batch` of BATCH_RECORDS
    records, until the event `until` is set (at most 300 s); the list it returns gets whether it
    was set in time."""
    import orchestrator.data.pipeline as pipeline

    held: list[bool] = []
    tables_on_driver = pipeline._tables_on_driver

    def paced(*args, **kwargs):
        for i, table in enumerate(tables_on_driver(*args, **kwargs)):
            yield table
            if i == batch - 1:
                held.append(until.wait(300))

    monkeypatch.setattr(pipeline, "_tables_on_driver", paced)
    return held


def test_a_run_training_while_its_data_is_tokenized_trains_as_one_that_waited(tmp_path, ray_local, tiny_base,
                                                                              monkeypatch):
    """A large source (here: every source, the size limit set to 0) with training.max_steps set
    is tokenized while the job trains (here on the driver: the 2 workers take both CPUs): the
    workers follow the Parquet parts as they are written, so the run trains its first step while
    the rest of the file waits (held here until it has). The run's counts come at its end, its
    data goes into the cache, and a run reading that cache entry gives the same evaluations,
    step for step."""
    import threading

    from mlflow import MlflowClient
    from conftest import REPO
    from test_end_to_end import quickstart

    import orchestrator.data.cache as cache
    import orchestrator.data.pipeline as pipeline
    from orchestrator.training.recipe import run_job
    from orchestrator.training.steps import SHUFFLE_WINDOW

    monkeypatch.setattr(pipeline, "DRIVER_MAX_BYTES", 0)
    monkeypatch.setattr(cache, "cache_root", lambda: tmp_path / "cache")  # this test's own tokenized-data cache
    lines = (REPO / QUICKSTART["train"]).read_text().splitlines() * 5
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(lines) + "\n")
    # The driver tokenizes batches of BATCH_RECORDS records; part k closes at BATCH_RECORDS << k
    # rows. Held before its 8th batch, the driver has closed parts 0-2 (7 batches: 7,168 records),
    # more than the first shuffle window of training examples the first step needs.
    hold_at = 7
    assert hold_at * pipeline.BATCH_RECORDS * 0.9 > SHUFFLE_WINDOW and len(lines) > (hold_at + 1) * pipeline.BATCH_RECORDS
    stepped = threading.Event()
    held = hold_the_driver(monkeypatch, hold_at, until=stepped)  # until the run has trained a step
    on_progress = lambda task, step, total, metrics: task == "training" and step >= 1 and stepped.set()  # noqa: E731
    sets = {"data.train": str(train), "data.eval": 0.05, "training.max_steps": 8, "training.eval_every": 4,
            "training.eval_batches": 2, "registry.mode": "adapter"}

    def run(name: str, **more):
        said: list[str] = []
        summary = run_job(quickstart(tmp_path, name=name, **sets, **more), status=said.append, register=False,
                          progress=on_progress)
        history = MlflowClient(summary.tracking_uri).get_metric_history(summary.run_id, "eval_loss")
        return summary, said, [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)]

    streamed, said, evals = run("while-tokenizing")
    assert any(s.startswith(f"Tokenizing {train} while training (data.train_while_tokenizing): on this machine")
               for s in said), said
    assert held == [True]  # the first step came while the rest of the file was not yet tokenized
    assert streamed.data["train_examples"] + streamed.data["eval_examples"] == len(lines)
    waited, said_again, evals_again = run("after-tokenizing", **{"data.train_while_tokenizing": "false"})
    assert any(s.startswith("Tokenized data from the cache") for s in said_again), said_again
    assert waited.data == streamed.data
    assert [step for step, _ in evals] == [0, 4, 8]
    assert [v for _, v in evals] == pytest.approx([v for _, v in evals_again], abs=1e-4)


def test_a_bad_record_found_while_the_workers_run_fails_the_run_with_its_problem(tmp_path, ray_local, tiny_base,
                                                                                 monkeypatch):
    """A record's problem met while the workers already run (here: they have made the step-0
    evaluation and wait for their first shuffle window, which holds the record): the workers stop
    with it, Ray Train's restarts (without limit here) end at once, and the run raises the record's
    problem, not Ray Train's failure; the MLflow run is marked FAILED and nothing is cached."""
    import threading

    from mlflow import MlflowClient
    from conftest import REPO
    from test_end_to_end import quickstart

    import orchestrator.data.cache as cache
    import orchestrator.data.pipeline as pipeline
    from orchestrator.training.recipe import run_job
    from orchestrator.training.steps import SHUFFLE_WINDOW

    monkeypatch.setattr(pipeline, "DRIVER_MAX_BYTES", 0)
    monkeypatch.setattr(cache, "cache_root", lambda: tmp_path / "cache")
    lines = (REPO / QUICKSTART["train"]).read_text().splitlines() * 3
    # In the driver's third batch of records, inside the first shuffle window: no step can train
    # before the driver reaches it, and it holds that batch until the workers have evaluated.
    bad_at, hold_at = 2 * pipeline.BATCH_RECORDS + 400, 2
    assert bad_at < SHUFFLE_WINDOW and hold_at * pipeline.BATCH_RECORDS <= bad_at < (hold_at + 1) * pipeline.BATCH_RECORDS
    lines.insert(bad_at, '{"instruction": "Say owl."}')
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(lines) + "\n")
    evaluated = threading.Event()
    held = hold_the_driver(monkeypatch, hold_at, until=evaluated)
    on_progress = lambda task, step, total, metrics: task == "training" and step == 0 and evaluated.set()  # noqa: E731
    spec = quickstart(tmp_path, name="bad-record-while-training", **{
        "data.train": str(train), "data.eval": 0.05, "training.max_steps": 8, "training.eval_batches": 2,
        "distributed.max_failures": -1})
    said: list[str] = []
    with pytest.raises(SpecError, match=f"{train}:{bad_at + 1}: the record lacks output") as raised:
        run_job(spec, status=said.append, register=False, progress=on_progress)
    assert held == [True]  # the workers ran (their step-0 evaluation) before the record was read
    assert any("while training" in s for s in said), said
    assert raised.value.problems[0].path == "data.train"
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert run.info.status == "FAILED"
    assert not client.get_metric_history(run.info.run_id, "train_loss")  # no step could train without the record
    assert not [d for d in (tmp_path / "cache" / "tokenized").iterdir() if not d.name.startswith(".")]


def test_a_record_problem_found_by_ray_data_is_said_once(tmp_path, ray_local, tiny_base, capfd):
    """Ray Data tokenizing: a record's problem reaches the caller as its `SpecError`, and Ray
    Data's console does not print it first with Ray's whole traceback."""
    from conftest import REPO

    from orchestrator.data.cache import prepare_datasets

    train = tmp_path / "train.jsonl"
    train.write_text((REPO / QUICKSTART["train"]).read_text() + '{"instruction": "Say owl.", "output": null}\n')
    with pytest.raises(SpecError, match=f"{train}: the record beginning .*Say owl.* has output: null"):
        prepare_datasets(DataSpec(train=str(train), eval=0.05), 42, str(tiny_base), cache_dir=tmp_path, use_ray=True)
    err = capfd.readouterr().err
    assert "Say owl" not in err and "Traceback" not in err, err[-3000:]


@pytest.mark.parametrize("record,expected", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "chat"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "chat"),  # ShareGPT
    ({"instruction": "x", "output": "y"}, "alpaca"),
    ({"text": "x"}, "text"),
    ({"question": "x"}, "alpaca"),  # none of them: the job's own format, whose check names what is missing
])
def test_evaluate_reads_a_records_format_from_its_fields(record, expected):
    from orchestrator.evaluation.evaluate import detect_format

    assert detect_format(record, DataSpec(train="x", format="alpaca")) == expected
