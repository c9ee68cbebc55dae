"""Tokenized data sets (Parquet), cached across runs of a job by everything they depend on: a job run again
loads no tokenizer (and imports no transformers) and tokenizes nothing."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from orchestrator.data.files import data_files_sha256, hash_file
from orchestrator.data.pipeline import TokenizedData
from orchestrator.planning.catalogue import cache_root
from orchestrator.spec import DataSpec

# What reads, formats and tokenizes records, and this file (the cached format): changing any of
# them changes every cache key.
_CODE = tuple(Path(__file__).with_name(name) for name in ("records.py", "formats.py", "tokenize.py", "sources.py",
                                                          "pipeline.py", "cache.py"))
# A base's weight files: large, and not the tokenizer's, so left out of the cache key.
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz"}
CACHE_KEEP = 16  # the most recently used data sets the cache keeps


# Data settings applied as the workers read the rows, not when they are tokenized.
_READ_TIME = {"packing", "train_while_tokenizing"}


def tokenized_cache_key(data: DataSpec, seed: int, base_path: str, files_sha256: dict[str, str],
                        trust_remote_code: bool = False) -> str:
    """sha256 of everything the tokenized data sets depend on: the spec's data section (but
    `packing`, done as the workers read, and `train_while_tokenizing`), the seed
    (it splits off an eval fraction), the data files (`files_sha256`), the base's files other than
    weights (the tokenizer, its chat template), the code that formats and tokenizes, and the
    transformers and tokenizers versions. Raises OSError when a file cannot be read."""
    import hashlib
    from importlib.metadata import version

    digest = hashlib.sha256(json.dumps(
        {"data": data.model_dump(mode="json", exclude=_READ_TIME), "seed": seed, "trust_remote_code": trust_remote_code,
         "files": files_sha256, "versions": [version("transformers"), version("tokenizers")]},
        sort_keys=True).encode())
    files = sorted(f for f in Path(base_path).iterdir() if f.is_file() and f.suffix not in _WEIGHT_SUFFIXES)
    for f in files + list(_CODE):
        digest.update(f.name.encode() + b"\0")
        hash_file(digest, f)
    return digest.hexdigest()


def prepare_datasets(data: DataSpec, seed: int, base_path: str, trust_remote_code: bool = False,
                     cache_dir: Path | None = None, revision: str | None = None, use_ray: bool | None = None,
                     connect=None) -> tuple[TokenizedData, Path | None]:
    """The job's tokenized data (Parquet files, their counts, the data files' sha256), and the
    cache entry it came from (None when it was tokenized now). A job run again with the same
    data, base and settings skips loading the tokenizer (and importing transformers) and
    tokenizing; problems with the data are raised as `pipeline` raises them (only data that
    tokenized without one is cached). `use_ray`, `connect`: as `tokenize_to_parquet` takes them."""
    job = start_tokenizing(data, seed, base_path, trust_remote_code, cache_dir, revision, use_ray, connect,
                           background=False)
    try:
        job.wait()
    finally:
        done = job.close()  # into the cache; after a problem, the files are removed
    return done, job.cached


class Tokenizing:
    """The job's tokenized data, from the cache or being written (`start_tokenizing`).

    `data` can be read at once: while the parts are written its `complete` is False and readers
    follow them (a run trains while its data is tokenized). `wait()` gives the finished data with
    its counts (or raises the problem tokenizing met); `close()`, once nothing reads `data` any
    more, moves the finished files into the cache, or stops tokenizing that still runs (the run
    stopped first) and removes its files, as after a failure."""

    def __init__(self, data: TokenizedData, cached: Path | None = None, entry: Path | None = None):
        import threading

        from orchestrator.data.pipeline import new_stats

        self.data, self.cached, self.entry = data, cached, entry  # `entry`: where the cache keeps it
        self.counts = new_stats()  # as tokenizing goes (its thread adds to them)
        # Set by close() while tokenizing runs: the writer stops at its next table, and the thread
        # cleans up when it ends.
        self.stop = threading.Event()
        self._done = data if cached is not None else None
        self._error: BaseException | None = None
        self._thread = None
        self._lock = threading.Lock()
        self._ended = False  # the thread has set its outcome (under the lock)

    def run(self, tokenize, background: bool) -> "Tokenizing":
        """Tokenize into `data.path` (`tokenize()` returns the meta: counts and padding id), in a
        thread when `background`. The meta, with how long it took, is written last."""
        import threading
        import time

        def go() -> None:
            started = time.perf_counter()
            try:
                meta = {**tokenize(), "tokenize_s": round(time.perf_counter() - started, 2)}
                (Path(self.data.path) / _META).write_text(json.dumps(meta), encoding="utf-8")
                done, error = replace(self.data, stats=meta["stats"], complete=True), None
            except BaseException as e:  # raised by wait()
                done, error = None, e
            with self._lock:
                self._done, self._error, self._ended = done, error, True
                if self.stop.is_set():
                    self._finish()

        if background:
            self._thread = threading.Thread(target=go, name="tokenizing", daemon=True)
            self._thread.start()
        else:
            go()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._ended

    @property
    def records(self) -> int:
        """Records tokenized so far."""
        c = self.counts
        return c["train_examples"] + c["eval_examples"] + c["dropped_examples"]

    def problem(self) -> BaseException | None:
        """The problem tokenizing stopped with, if it did (its readers stop on it a moment later:
        the `_failed` file is written just before)."""
        return self._error

    def wait(self, on_progress=None) -> TokenizedData:
        """The finished data (raises the problem tokenizing met); `on_progress(records)` is
        called about twice a second while it runs."""
        waited = self.running
        while self.running:
            if on_progress is not None:
                on_progress(self.records)
            self._thread.join(0.5)
        if waited and on_progress is not None:
            on_progress(self.records)  # the last count
        if self._error is not None:
            raise self._error
        return self._done

    def close(self) -> TokenizedData | None:
        """The finished data in its cache entry (or where it was written when it has none); None
        after a failure, whose files are removed. Call once nothing reads `data`; called while
        tokenizing still runs (the run stopped first), it stops it, and the thread removes the
        files when it ends."""
        with self._lock:
            if self.running:
                self.stop.set()
                return None
            return self._finish()

    def _finish(self) -> TokenizedData | None:
        import contextlib
        import os
        import shutil

        if self.cached is not None:
            return self._done
        work = Path(self.data.path)
        if self._done is None:
            shutil.rmtree(work, ignore_errors=True)
            return None
        final = work
        if self.entry is not None and Path(self._done.path) == work:
            with contextlib.suppress(OSError):
                if (self.entry / _META).is_file():  # another run of the same data cached it meanwhile
                    shutil.rmtree(work, ignore_errors=True)
                else:
                    shutil.rmtree(self.entry, ignore_errors=True)  # a damaged entry
                    os.replace(work, self.entry)  # atomic: a concurrent run sees the whole entry or none
                final = self.entry
                _evict(self.entry.parent)
        self._done = replace(self._done, path=str(final))
        return self._done


def start_tokenizing(data: DataSpec, seed: int, base_path: str, trust_remote_code: bool = False,
                     cache_dir: Path | None = None, revision: str | None = None, use_ray: bool | None = None,
                     connect=None, background: bool = True, ray_cpus: float | None = None) -> Tokenizing:
    """The job's tokenized data from the cache, or tokenized now (in a thread when `background`:
    readers follow the parts as they are written). The tokenizer is loaded and the chat template
    checked before this returns, so those problems are raised here; a record's problem comes
    from `Tokenizing.wait()`. `use_ray`, `connect`, `ray_cpus`: as `tokenize_to_parquet`
    takes them."""
    import contextlib
    import os
    import shutil
    import tempfile

    from orchestrator.data.pipeline import make_split_dirs, tokenize_to_parquet

    cache_dir = cache_dir or cache_root() / "tokenized"
    try:
        files_sha256 = data_files_sha256(data)
    except OSError:  # a data file that cannot be read: tokenizing names the problem
        files_sha256 = None
    path = None
    if files_sha256 is not None:
        with contextlib.suppress(OSError):  # a base file that cannot be read: no caching
            path = cache_dir / tokenized_cache_key(data, seed, base_path, files_sha256, trust_remote_code)
    if path is not None and (path / _META).is_file():
        try:
            meta = json.loads((path / _META).read_text(encoding="utf-8"))
            os.utime(path)  # recently used: kept
            return Tokenizing(TokenizedData(path=str(path), stats=meta["stats"], pad_id=meta["pad_id"],
                                            files_sha256=files_sha256), cached=path)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # damaged or from another version: tokenized again and rewritten
    from orchestrator.data.tokenize import check_chat_template, load_tokenizer

    tokenizer = load_tokenizer(base_path, trust_remote_code, revision, data.chat_template)
    check_chat_template(data, tokenizer)  # before any record is read
    parent = path.parent if path is not None else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=parent, prefix=_work_prefix()))
    try:
        make_split_dirs(data, work)  # readers of the data being written know its splits from the start
    except BaseException:  # a source with no files
        shutil.rmtree(work, ignore_errors=True)
        raise
    job = Tokenizing(TokenizedData(path=str(work), stats={}, pad_id=tokenizer.pad_token_id,
                                   files_sha256=files_sha256 or {}, complete=False), entry=path)

    def tokenize() -> dict:
        stats = tokenize_to_parquet(data, seed, (base_path, trust_remote_code, revision, data.chat_template), work,
                                    use_ray=use_ray, connect=connect, stats=job.counts, stop=job.stop,
                                    ray_cpus=ray_cpus)
        return {"stats": stats, "pad_id": tokenizer.pad_token_id}

    return job.run(tokenize, background)


_META = "meta.json"  # written last: an entry without it is incomplete


def shared(data: TokenizedData, storage_path: str) -> TokenizedData:
    """`data` where workers on every node can read it: copied once into
    `storage_path/tokenized/<cache key>` (shared storage, where the job's checkpoints go too:
    s3://..., gs://..., or a path mounted on every node) and read from there. Data already in
    such storage is returned as it is."""
    import pyarrow.fs as pafs

    from orchestrator.data.pipeline import SPLITS
    from orchestrator.spec.checks import is_uri
    from orchestrator.storage import storage_location

    if is_uri(data.path):
        return data
    target = replace(data, path=storage_location(storage_path, "tokenized", Path(data.path).name))
    fs, root = target.filesystem()
    if fs.get_file_info(f"{root}/{_META}").type == pafs.FileType.NotFound:
        source = Path(data.path).resolve()
        fs.create_dir(root, recursive=True)
        for split in SPLITS:
            if (source / split).is_dir():
                fs.create_dir(f"{root}/{split}", recursive=True)  # a local or mounted path needs it; a bucket ignores it
                pafs.copy_files(str(source / split), f"{root}/{split}", source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=fs)
        pafs.copy_files(str(source / _META), f"{root}/{_META}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)  # last: an entry without it is copied again
    return target


_WORK_PREFIX = ".tokenizing-"  # + the writing process (pid@host): data being tokenized, not yet an entry


def _work_prefix(pid: int | None = None) -> str:
    import os
    import socket

    return f"{_WORK_PREFIX}{pid or os.getpid()}@{socket.gethostname()}-"


def _evict(cache_dir: Path) -> None:
    """Keep the `CACHE_KEEP` most recently used entries; remove what runs on this machine that
    were stopped while tokenizing left behind (their process is gone; a cache shared between
    machines keeps the others')."""
    import shutil

    entries = [d for d in cache_dir.iterdir() if d.is_dir() and not d.name.startswith(".")]
    for old in sorted(entries, key=lambda d: d.stat().st_mtime, reverse=True)[CACHE_KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
    for work in cache_dir.glob(f"{_WORK_PREFIX}*"):
        pid = work.name[len(_WORK_PREFIX):].split("@")[0]
        if pid.isdigit() and work.name.startswith(_work_prefix(int(pid))) and not _alive(int(pid)):
            shutil.rmtree(work, ignore_errors=True)


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True
