"""Where a job's outputs live (`storage.path`): a local or mounted path, or a URI in a bucket
(s3://bucket/prefix, gs://..., with `?endpoint_override=...` and the like), read and written
through pyarrow's filesystems as Ray Train does, with the bucket's credentials and endpoint from
the environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import tempfile
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

from orchestrator.spec.checks import is_uri


def storage_root(storage_path: str) -> str:
    """`storage.path` as Ray Train takes it: a URI (s3://bucket/prefix) as it is, a local path made absolute."""
    return storage_path if is_uri(storage_path) else str(Path(storage_path).resolve())


def storage_location(location: str, *parts: str) -> str:
    """`location` (a local path or a URI such as s3://bucket/prefix?endpoint_override=...) with
    `parts` appended to its path (before the URI's query)."""
    if not is_uri(location):
        return os.path.join(location, *parts)
    url = urllib.parse.urlsplit(location)
    return urllib.parse.urlunsplit(url._replace(path="/".join([url.path.rstrip("/"), *parts])))


def _filesystem(location: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(storage_root(location))


def read_json(location: str):
    """The JSON file at `location` (a local path or a URI), or None when there is none."""
    import json

    import pyarrow.fs

    fs, path = _filesystem(location)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return json.loads(stream.read().decode("utf-8"))


# Bytes read per request when fetching from a bucket, and files fetched at once (a full model's
# weights are a few multi-GB shards: one stream each).
_CHUNK = 8 << 20
_FILES_AT_ONCE = 4


@contextlib.contextmanager
def local_copy(location: str, progress: Callable[[int, int], None] | None = None) -> Iterator[Path]:
    """The directory at `location` as a local directory: a local path as it is; a directory in a
    bucket downloaded into a temporary directory, removed when the block ends (a run's adapter,
    registered from the driver, without the optimizer state beside it in the checkpoint).
    `progress(bytes done, bytes in all)` follows the download."""
    if not is_uri(location):
        yield Path(location)
        return
    import pyarrow.fs

    fs, path = _filesystem(location)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        raise FileNotFoundError(f"no directory at {location}")
    files = [i for i in fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
             if i.type == pyarrow.fs.FileType.File]
    total, done, lock = sum(i.size for i in files), 0, threading.Lock()

    def fetch(info, into: Path) -> None:
        nonlocal done
        target = into / info.path[len(path):].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path) as source, open(target, "wb") as out:
            while chunk := source.read(_CHUNK):
                out.write(chunk)
                with lock:
                    done += len(chunk)
                    if progress:
                        progress(done, total)

    with tempfile.TemporaryDirectory(prefix="orchestrator-") as tmp:
        local = Path(tmp) / Path(path).name
        local.mkdir()
        with concurrent.futures.ThreadPoolExecutor(_FILES_AT_ONCE) as pool:
            for f in [pool.submit(fetch, info, local) for info in files]:
                f.result()
        yield local


def check_reachable(storage_path: str) -> None:
    """Raise `SpecError` when `storage.path` is a URI whose bucket cannot be read (no server at
    the endpoint, no such bucket, credentials refused), before anything starts: Ray Train would
    fail with pyarrow's traceback once the workers are up. A local path is created by Ray Train."""
    if not is_uri(storage_path):
        return
    import pyarrow.fs

    from orchestrator.spec import Problem, SpecError

    fix = ("check the bucket's name, and its credentials and endpoint in this machine's environment "
           "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...; GOOGLE_APPLICATION_CREDENTIALS)")
    try:
        fs, path = _filesystem(storage_path)
        # A bucket's prefix may not exist yet (Ray Train makes it); the bucket itself must.
        bucket = path.split("/", 1)[0] if fs.type_name in ("s3", "gcs") else None
        missing = bucket is not None and fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound
    except (OSError, ValueError) as e:
        raise SpecError([Problem(path="storage.path", message=f"cannot read {storage_path} ({e})", fix=fix)]) from None
    if missing:
        raise SpecError([Problem(path="storage.path", message=f"there is no bucket '{bucket}' at {storage_path}",
                                 fix="create it, or name a bucket that exists")])
