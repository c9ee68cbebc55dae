"""The tokenized data set as Parquet: records -> format + tokenize (batched, the fast tokenizer)
-> int32 columns, written once per cache key and read straight from its files by every worker.

A source holding more than `DRIVER_MAX_BYTES` of data (a compressed file counted as the text it
holds: `sources.source_bytes`), or remote, is tokenized by Ray Data (read -> `map_batches`
in parallel over the cluster's CPUs); a small one is streamed through the same batch function on
the driver (no Ray needed: its problems are found before Ray starts). Either way the driver writes
the tokenized tables as numbered Parquet parts (`write_parts`), each appearing whole, so that
training can read a split while it is still being written (`TokenizedData.complete` False: the
readers follow the parts until the split's `_done` marker). Nothing holds the whole data set: at
most a few batches of records at a time.

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
# Part k of a split holds up to BATCH_RECORDS x 2**k rows, at most PART_MAX_ROWS: the first parts
# are small, so that a run training while its data is tokenized starts after a batch of records.
PART_MAX_ROWS = 64 * BATCH_RECORDS
DONE = "_done"  # in a split's directory, written after its last part
FAILED = "_failed"  # in the data's directory: tokenizing stopped with this problem; readers stop too
FOLLOW_POLL_S = 0.2  # how often a reader looks for the next part of a split still being written


def part_name(k: int) -> str:
    return f"part-{k:06d}.parquet"


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


def is_large(source: Source) -> bool:
    """Tokenized by Ray Data (by size, when not told): over `DRIVER_MAX_BYTES`, or remote."""
    return source.remote or source_bytes(source, DRIVER_MAX_BYTES) > DRIVER_MAX_BYTES


def _sources(data: DataSpec) -> dict[str, Source]:
    sources = {"train": resolve_source(data.train, "data.train")}
    if isinstance(data.eval, str):
        sources["eval"] = resolve_source(data.eval, "data.eval")
    return sources


def tokenize_to_parquet(data: DataSpec, seed: int, tokenizer_args: tuple, out_dir: Path,
                        use_ray: bool | None = None, connect=None, stats: dict[str, Any] | None = None,
                        stop=None, ray_cpus: float | None = None) -> dict[str, Any]:
    """Write the job's tokenized sources under `out_dir/<split>/` as Parquet parts (`write_parts`)
    and return their counts (`new_stats`). `tokenizer_args`: (base path, trust_remote_code,
    revision, chat_template). `use_ray`: None decides by size; `connect()` is called before Ray
    Data is first used (the driver joins or starts Ray then). The eval source (if any) is written
    first: a run that trains while its data is tokenized evaluates the base before its first step.
    On a problem the data's directory gets a `_failed` file with it (readers stop), and it is raised.
    `stats`: counts (`new_stats`) to add to as the tables are written (another thread may read them).
    `stop`: a `threading.Event` that stops the writing at the next table (`Stopped`).
    `ray_cpus`: the most CPUs Ray Data may use (None: the cluster's), leaving the rest to a
    run's training workers beside it."""
    sources = make_split_dirs(data, out_dir)
    stats = new_stats() if stats is None else stats
    try:
        for split in sorted(sources, key=SPLITS.index, reverse=True):
            source = sources[split]
            ray_it = use_ray if use_ray is not None else is_large(source)
            if ray_it and connect is not None:
                connect()
            tables = (_tables_from_ray(source, data, seed, tokenizer_args, split == "eval", ray_cpus) if ray_it
                      else _tables_on_driver(source, data, seed, _tokenizer(*tokenizer_args), all_eval=split == "eval"))
            write_parts(tables, out_dir / split, stats, stop)
    except BaseException as e:
        (out_dir / FAILED).write_text(str(e) or type(e).__name__, encoding="utf-8")
        raise
    return finish_stats(stats)


def make_split_dirs(data: DataSpec, out_dir: Path) -> dict[str, Source]:
    """The job's sources by split, each with its (empty) directory under `out_dir`: made before
    any part is written, so that readers know which splits there are."""
    sources = _sources(data)
    for split in sources:
        (out_dir / split).mkdir(parents=True, exist_ok=True)
    return sources


class Stopped(Exception):
    """Tokenizing was stopped (`stop` set): the run that wanted the data ended first."""


def write_parts(tables, target: Path, stats: dict[str, Any] | None = None, stop=None) -> None:
    """Write an iterable of tokenized tables into `target` as numbered Parquet parts, each written
    under a temporary name and renamed (a reader sees a part whole or not at all), then `_done`.
    `stats` (from `new_stats`) counts the rows as they pass; `stop` set: raise `Stopped`."""
    import os

    import pyarrow.parquet as pq

    k, rows, writer, temp = 0, 0, None, target / ".part.tmp"

    def close() -> None:
        nonlocal k, rows, writer
        writer.close()
        os.replace(temp, target / part_name(k))
        k, rows, writer = k + 1, 0, None

    for table in tables:
        if stop is not None and stop.is_set():
            raise Stopped("tokenizing was stopped")
        if writer is None:
            writer = pq.ParquetWriter(temp, _schema())
        writer.write_table(table)
        rows += table.num_rows
        if stats is not None:
            add_stats(stats, table)
        if rows >= min(BATCH_RECORDS << k, PART_MAX_ROWS):
            close()
    if writer is not None:
        close()
    (target / DONE).touch()


def _tables_on_driver(source: Source, data: DataSpec, seed: int, tokenizer, all_eval: bool):
    batch = []
    for where, record in iter_records(source):
        batch.append((where, record))
        if len(batch) == BATCH_RECORDS:
            yield _driver_table(batch, data, seed, tokenizer, source.field_path, all_eval)
            batch = []
    if batch:
        yield _driver_table(batch, data, seed, tokenizer, source.field_path, all_eval)


def _driver_table(batch: list, data: DataSpec, seed: int, tokenizer, field_path: str, all_eval: bool):
    return tokenized_table([r for _, r in batch], [f"{w}: the record" for w, _ in batch], data, tokenizer, field_path,
                           seed=seed, all_eval=all_eval)


class _OursToSay:
    """A filter for Ray Data's console: what it would print that the run says itself. A record's
    `SpecError` comes with Ray's whole traceback there, before the run names the problem in one
    line; and the note that progress bars are off (on purpose: the run shows its own)."""

    def filter(self, record) -> bool:
        if record.exc_info and _spec_error_in(record.exc_info[1]) is not None:
            return False
        return not record.getMessage().startswith("Progress bars disabled")


def quiet_data_context():
    """Ray Data's context for tokenizing: rows in a fixed order (the data order is seeded, and a
    resumed run must see the same rows), no progress bars in the workers' logs."""
    import logging

    import ray.data

    ray_data = logging.getLogger("ray.data")
    ray_data.setLevel(logging.WARNING)  # its INFO lines would interleave with our output
    for handler in ray_data.handlers:  # its child loggers' records reach them, not its own filters
        if not any(isinstance(f, _OursToSay) for f in handler.filters):
            handler.addFilter(_OursToSay())
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.use_datasource_v2 = False
    ctx.raise_original_map_exception = True  # a record's `SpecError` reaches the driver as itself
    return ctx


def _tables_from_ray(source: Source, data: DataSpec, seed: int, tokenizer_args: tuple, all_eval: bool,
                     cpus: float | None = None):
    """The source's tokenized tables, in order, from Ray Data: read -> `map_batches` over the
    cluster's CPUs (at most `cpus`), streamed to the driver, which writes them (so the files land
    on the driver's disk however many nodes tokenized)."""
    import ray
    import ray.data
    from ray.data import ExecutionResources

    ctx = quiet_data_context()
    # Set for each data set (it keeps the context it was made under): a run's training workers,
    # started beside it, keep their CPUs.
    ctx.execution_options.resource_limits = ExecutionResources.for_limits(cpu=cpus)
    fs = source.filesystem()
    jsonl = source.format == "jsonl"
    read = ray.data.read_text if jsonl else ray.data.read_parquet
    # Only the driver's node is known to have a local source: it is read there (Ray's own
    # `ray.io/node-id` label, what Ray Data itself uses to keep a task on the driver's node).
    # The tokenizing runs on any node.
    here = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
    ds = read(list(source.files), filesystem=fs, label_selector=None if source.remote else here)
    ds = ds.map_batches(_tokenize_ray_batch, batch_format="pyarrow", batch_size=BATCH_RECORDS, fn_kwargs={
        "data_json": data.model_dump(mode="json"), "tokenizer_args": tokenizer_args, "seed": seed,
        "all_eval": all_eval, "label": source.value, "field_path": source.field_path, "jsonl": jsonl})
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
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


def new_stats() -> dict[str, Any]:
    """Counts of tokenized data, added to table by table (`add_stats`): examples, tokens,
    truncated and dropped examples (no trained token left, e.g. a response truncated away)."""
    return {"train_examples": 0, "eval_examples": 0, "train_tokens": 0, "truncated_examples": 0,
            "dropped_examples": 0}


def add_stats(stats: dict[str, Any], table) -> None:
    import pyarrow.compute as pc

    count = lambda mask: pc.sum(mask).as_py() or 0  # noqa: E731
    kept, held = pc.greater(table.column("trained"), 0), table.column("eval")
    train = pc.and_(kept, pc.invert(held))
    stats["train_examples"] += count(train)
    stats["eval_examples"] += count(pc.and_(kept, held))
    stats["truncated_examples"] += count(table.column("truncated"))
    stats["dropped_examples"] += count(pc.invert(kept))
    lengths = pc.list_value_length(table.column("input_ids"))
    stats["train_tokens"] += pc.sum(pc.filter(lengths, train)).as_py() or 0


def finish_stats(stats: dict[str, Any]) -> dict[str, Any]:
    return {**stats, "mean_seq_len": round(stats["train_tokens"] / max(1, stats["train_examples"]), 1)}


@dataclass
class TokenizedData:
    """The job's tokenized data: where its Parquet files are, its counts, the tokenizer's padding
    id and the data files' sha256 (lineage). Small: the driver passes it around, never the rows."""

    path: str  # a directory with train/ (and eval/ when data.eval names a source)
    stats: dict[str, Any]  # empty while the data is being written
    pad_id: int | None
    files_sha256: dict[str, str] = field(default_factory=dict)
    # False: the parts are still being written (training beside tokenizing); readers follow them.
    complete: bool = True

    @property
    def train_examples(self) -> int | None:
        """None while the data is being written."""
        return int(self.stats["train_examples"]) if self.complete else None

    def files(self, split: str, located=None) -> list[str]:
        """The Parquet files that hold `split`'s rows, in their order (eval rows of a held-out
        fraction live with the training rows, marked `eval`), as paths in `filesystem()` (or in
        `located`, a `filesystem()` the caller already has)."""
        import pyarrow.fs as pafs

        fs, _ = located = located or self.filesystem()
        folder = self._folder(split, located)
        return sorted(i.path for i in fs.get_file_info(pafs.FileSelector(folder)) if i.path.endswith(".parquet"))

    def _folder(self, split: str, located) -> str:
        import pyarrow.fs as pafs

        fs, root = located
        folder = f"{root}/{split}"
        if split == "eval" and fs.get_file_info(folder).type != pafs.FileType.Directory:
            folder = f"{root}/train"
        return folder

    def failed(self) -> bool:
        """Tokenizing this data (still being written) stopped with a problem (`_failed`)."""
        import pyarrow.fs as pafs

        if self.complete:
            return False
        fs, root = self.filesystem()
        return fs.get_file_info(f"{root}/{FAILED}").type == pafs.FileType.File

    def following(self, split: str, located=None, poll_s: float = FOLLOW_POLL_S) -> Iterator[str]:
        """`split`'s parts in order as they are written: each part once it is whole, waiting for
        the next until the split's `_done` marker. Raises `RuntimeError` with the problem when
        tokenizing failed (or the data's directory was removed)."""
        import time

        import pyarrow.fs as pafs

        fs, root = located = located or self.filesystem()
        folder = self._folder(split, located)
        k = 0
        while True:
            part, done, failed = fs.get_file_info([f"{folder}/{part_name(k)}", f"{folder}/{DONE}", f"{root}/{FAILED}"])
            if part.type == pafs.FileType.File:
                yield part.path
                k += 1
            elif done.type == pafs.FileType.File:
                if fs.get_file_info(part.path).type != pafs.FileType.File:  # not written just before `_done`
                    return
            elif failed.type == pafs.FileType.File:
                with fs.open_input_stream(failed.path) as fh:
                    raise RuntimeError(f"tokenizing the data failed: {fh.read().decode()}")
            elif fs.get_file_info(folder).type != pafs.FileType.Directory:
                raise RuntimeError(f"the tokenized data at {folder} was removed while it was being read")
            else:
                time.sleep(poll_s)

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
        for path in self.files(split, located) if self.complete else self.following(split, located):
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
