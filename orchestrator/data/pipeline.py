"""The tokenized data set as Parquet: records -> format + tokenize (batched, the fast tokenizer)
-> int32 columns, written once per cache key and read straight from its files by every worker.

A source larger than `DRIVER_MAX_BYTES` (or remote) is tokenized by Ray Data: read -> `map_batches`
in parallel over the cluster's CPUs -> `write_parquet`; a small one is streamed through the same
batch function on the driver (no Ray needed: its problems are found before Ray starts). Neither
holds the whole data set: at most one batch of records at a time.

Each row: `input_ids`, `labels` (list<int32>), `eval` (held out for evaluation), `truncated`,
`trained` (trained tokens; 0: the example trains nothing and is skipped, counted as dropped).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from orchestrator.data.records import Example, in_eval
from orchestrator.data.sources import Source, iter_records, resolve_source, source_bytes
from orchestrator.spec import DataSpec, SpecError
from orchestrator.spec.checks import is_uri

# Sources up to this size are tokenized on the driver (the quickstart's 0.4 MB take about a
# second); larger ones by Ray Data across the cluster's CPUs.
DRIVER_MAX_BYTES = 16 << 20
BATCH_RECORDS = 1024  # records formatted and tokenized per call (one Parquet row group each)
SPLITS = ("train", "eval")


def _schema():
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    return pa.schema([("input_ids", ids), ("labels", ids), ("eval", pa.bool_()), ("truncated", pa.bool_()),
                      ("trained", pa.int32())])


def tokenized_table(records: list[dict], wheres: list[str], data: DataSpec, tokenizer, field_path: str, *,
                    seed: int, all_eval: bool):
    """One batch of records as a pyarrow table of the schema above; problems as
    `tokenize_records` raises them. `all_eval`: the records come from the eval source."""
    import pyarrow as pa

    from orchestrator.data.tokenize import tokenize_records

    results = tokenize_records(records, wheres, data, tokenizer, field_path)
    held = [all_eval or (isinstance(data.eval, float) and in_eval(r, seed, data.eval)) for r in records]
    return pa.table({"input_ids": [e.input_ids for e, _ in results], "labels": [e.labels for e, _ in results],
                     "eval": held, "truncated": [cut for _, cut in results],
                     "trained": [e.num_trained_tokens for e, _ in results]}, schema=_schema())


@functools.lru_cache(maxsize=4)
def _tokenizer(base_path: str, trust_remote_code: bool, revision: str | None, chat_template: str | None):
    from orchestrator.data.tokenize import load_tokenizer

    return load_tokenizer(base_path, trust_remote_code, revision, chat_template)


def _tokenize_ray_batch(batch, *, data_json: dict, tokenizer_args: tuple, seed: int, all_eval: bool,
                        label: str, field_path: str, jsonl: bool):
    """Ray Data's `map_batches` function: a pyarrow batch of records (JSONL lines in a `text`
    column, or Parquet rows) -> tokenized rows. The tokenizer loads once per Ray worker process."""
    from orchestrator.data.records import parse_line

    data = DataSpec.model_validate(data_json)
    if jsonl:
        lines = [line for line in batch.column("text").to_pylist() if line.strip()]
        wheres = [f"{label}: the record beginning {line[:48]!r}" for line in lines]
        records = [parse_line(line, label, 0, field_path) for line in lines]
    else:
        records = batch.to_pylist()
        wheres = [f"{label}: the record {json.dumps(r, default=str)[:60]}" for r in records]
    return tokenized_table(records, wheres, data, _tokenizer(*tokenizer_args), field_path, seed=seed,
                           all_eval=all_eval)


def _sources(data: DataSpec) -> dict[str, Source]:
    sources = {"train": resolve_source(data.train, "data.train")}
    if isinstance(data.eval, str):
        sources["eval"] = resolve_source(data.eval, "data.eval")
    return sources


def tokenize_to_parquet(data: DataSpec, seed: int, tokenizer_args: tuple, out_dir: Path,
                        use_ray: bool | None = None, connect=None) -> None:
    """Write the job's tokenized sources under `out_dir/<split>/` as Parquet. `tokenizer_args`:
    (base path, trust_remote_code, revision, chat_template). `use_ray`: None decides by size;
    `connect()` is called before Ray Data is first used (the driver joins or starts Ray then)."""
    for split, source in _sources(data).items():
        target = out_dir / split
        target.mkdir(parents=True)
        ray_it = use_ray if use_ray is not None else (source.remote or source_bytes(source) > DRIVER_MAX_BYTES)
        if ray_it:
            if connect is not None:
                connect()
            _tokenize_with_ray(source, data, seed, tokenizer_args, target, all_eval=split == "eval")
        else:
            _tokenize_on_driver(source, data, seed, _tokenizer(*tokenizer_args), target, all_eval=split == "eval")


def _tokenize_on_driver(source: Source, data: DataSpec, seed: int, tokenizer, target: Path, all_eval: bool) -> None:
    import pyarrow.parquet as pq

    def flush(batch: list) -> None:
        writer.write_table(tokenized_table([r for _, r in batch], [f"{w}: the record" for w, _ in batch], data,
                                           tokenizer, source.field_path, seed=seed, all_eval=all_eval))

    with pq.ParquetWriter(target / "part-000000.parquet", _schema()) as writer:
        batch = []
        for where, record in iter_records(source):
            batch.append((where, record))
            if len(batch) == BATCH_RECORDS:
                flush(batch)
                batch = []
        if batch:
            flush(batch)


def quiet_data_context():
    """Ray Data's context for tokenizing: rows in a fixed order (the data order is seeded, and a
    resumed run must see the same rows), no progress bars in the workers' logs."""
    import logging

    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its INFO lines would interleave with our output
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.use_datasource_v2 = False
    ctx.raise_original_map_exception = True  # a record's `SpecError` reaches the driver as itself
    return ctx


def _tokenize_with_ray(source: Source, data: DataSpec, seed: int, tokenizer_args: tuple, target: Path,
                       all_eval: bool) -> None:
    import ray
    import ray.data

    quiet_data_context()
    fs = source.filesystem()
    jsonl = source.format == "jsonl"
    read = ray.data.read_text if jsonl else ray.data.read_parquet
    # `target` is on the driver's disk, so the write tasks run on the driver's node: on a cluster of
    # several nodes Ray Data would otherwise write each node's share of the files to that node's
    # own disk. A local source is read there too (only the driver's node is known to have it). The
    # tokenizing between them runs on any node. (Ray's own `ray.io/node-id` label: what Ray Data
    # itself uses to keep a task on the driver's node.)
    here = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
    ds = read(list(source.files), filesystem=fs, label_selector=None if source.remote else here)
    ds = ds.map_batches(_tokenize_ray_batch, batch_format="pyarrow", batch_size=BATCH_RECORDS, fn_kwargs={
        "data_json": data.model_dump(mode="json"), "tokenizer_args": tokenizer_args, "seed": seed,
        "all_eval": all_eval, "label": source.value, "field_path": source.field_path, "jsonl": jsonl})
    try:
        ds.write_parquet(str(target), ray_remote_args={"label_selector": here})
    except Exception as e:  # a record's problem raised in a Ray worker: the person's error, not ours
        problem = _spec_error_in(e)
        if problem is None:
            raise
        raise problem from None


def _spec_error_in(error: BaseException) -> SpecError | None:
    """The `SpecError` a Ray task raised, found in the exceptions Ray wraps it in."""
    todo, seen = [error], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        if isinstance(e, SpecError):
            return SpecError(e.problems)
        seen.add(id(e))
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


def tokenized_stats(out_dir: Path) -> dict[str, Any]:
    """Counts of the tokenized data, streamed batch by batch: examples, tokens, truncated and
    dropped examples (no trained token left, e.g. a response truncated away)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    stats = {"train_examples": 0, "eval_examples": 0, "train_tokens": 0, "truncated_examples": 0,
             "dropped_examples": 0}
    count = lambda mask: pc.sum(mask).as_py() or 0  # noqa: E731
    for split in SPLITS:
        if not (out_dir / split).is_dir():
            continue
        dataset = pads.dataset(str(out_dir / split), format="parquet")
        for batch in dataset.to_batches(columns=["input_ids", "eval", "truncated", "trained"], batch_size=4096):
            kept, held = pc.greater(batch.column("trained"), 0), batch.column("eval")
            train = pc.and_(kept, pc.invert(held))
            stats["train_examples"] += count(train)
            stats["eval_examples"] += count(pc.and_(kept, held))
            stats["truncated_examples"] += count(batch.column("truncated"))
            stats["dropped_examples"] += count(pc.invert(kept))
            lengths = pc.list_value_length(batch.column("input_ids"))
            stats["train_tokens"] += pc.sum(pc.filter(lengths, train)).as_py() or 0
    stats["mean_seq_len"] = round(stats["train_tokens"] / max(1, stats["train_examples"]), 1)
    return stats


@dataclass
class TokenizedData:
    """The job's tokenized data: where its Parquet files are, its counts, the tokenizer's padding
    id and the data files' sha256 (lineage). Small: the driver passes it around, never the rows."""

    path: str  # a directory with train/ (and eval/ when data.eval names a source)
    stats: dict[str, Any]
    pad_id: int | None
    files_sha256: dict[str, str] = field(default_factory=dict)

    @property
    def train_examples(self) -> int:
        return int(self.stats["train_examples"])

    def files(self, split: str, located=None) -> list[str]:
        """The Parquet files that hold `split`'s rows, in their order (eval rows of a held-out
        fraction live with the training rows, marked `eval`), as paths in `filesystem()` (or in
        `located`, a `filesystem()` the caller already has)."""
        import pyarrow.fs as pafs

        fs, root = located or self.filesystem()
        folder = f"{root}/{split}"
        if split == "eval" and fs.get_file_info(folder).type != pafs.FileType.Directory:
            folder = f"{root}/train"
        return sorted(i.path for i in fs.get_file_info(pafs.FileSelector(folder)) if i.path.endswith(".parquet"))

    def filesystem(self):
        """(pyarrow filesystem, the data's directory in it): the local disk, or shared storage
        (s3://, gs://...) where a job on several nodes reads it (`cache.shared`)."""
        import pyarrow.fs as pafs

        if is_uri(self.path):
            return pafs.FileSystem.from_uri(self.path)
        return pafs.LocalFileSystem(), str(Path(self.path).resolve())

    def row_batches(self, split: str, batch_size: int = BATCH_RECORDS) -> Iterator[dict]:
        """`split`'s rows in their stored order, read straight from its Parquet files: a dict of
        columns (Python lists) per batch of `batch_size` rows, one batch in memory at a time.

        This is how a training worker reads its data. Every rank reads every row and keeps its
        own (`steps.micro_batches`), so no worker holds more than a batch and which rows a rank
        trains on follows from the step alone. Read through Ray Data instead (a `read_parquet`
        per worker, Ray Train's `datasets=`), a cached 300,000-record set took 64 s to give its
        first batch and 145 s for 100,000 rows; read here, 0.1 s and 4.9 s (benchmarks/data_scale.py)."""
        import pyarrow.parquet as pq

        located = self.filesystem()
        fs, _ = located
        for path in self.files(split, located):
            with fs.open_input_file(path) as fh:
                for batch in pq.ParquetFile(fh).iter_batches(batch_size=batch_size):
                    yield batch.to_pydict()

    def examples(self, split: str) -> Iterator[Example]:
        """`split`'s examples, streamed from its Parquet files, in order."""
        for batch in self.row_batches(split):
            yield from rows_to_examples(batch, split == "eval")


def rows_to_examples(columns: dict, eval_rows: bool) -> Iterator[Example]:
    """The examples of a batch of tokenized rows (a dict of columns) that belong to training
    (`eval_rows` False) or evaluation, skipping those with no trained token."""
    for ids, labels, held, trained in zip(columns["input_ids"], columns["labels"], columns["eval"],
                                          columns["trained"]):
        if bool(held) == eval_rows and trained > 0:
            yield Example(input_ids=list(map(int, ids)), labels=list(map(int, labels)))
