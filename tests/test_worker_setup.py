"""A killed worker must not leave every later job waiting on DeepSpeed's op build lock."""

from __future__ import annotations

import os
import time

import pytest

from orchestrator.train_loop import release_stale_op_lock


@pytest.mark.parametrize("built, age_s, removed", [
    (True, 600, True),     # built op, lock left by a dead process: removed
    (True, 5, False),      # a live process is checking the build right now: kept
    (False, 600, False),   # not built: the lock may guard a long build: kept
])
def test_stale_op_lock(tmp_path, monkeypatch, built, age_s, removed):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = tmp_path / "deepspeed_shm_comm"
    folder.mkdir()
    if built:
        (folder / "deepspeed_shm_comm.so").write_bytes(b"")
    lock = folder / "lock"
    lock.write_bytes(b"")
    then = time.time() - age_s
    os.utime(lock, (then, then))

    assert release_stale_op_lock() is removed
    assert lock.exists() is not removed
