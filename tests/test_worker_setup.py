"""Worker-side housekeeping: DeepSpeed ops on the CPU, a stale op lock, and what rank 0 sends while it trains."""

from __future__ import annotations

import os
import time

import pytest

from orchestrator.training.worker import release_stale_op_lock, skip_shared_memory_comm_op


def test_cpu_workers_skip_deepspeeds_shared_memory_op():
    """DeepSpeed's CPU backend builds its shared-memory all-reduce op (a just-in-time compile on a
    machine's first run) unless the op is marked unavailable; after the skip it returns no op."""
    import deepspeed
    from deepspeed.comm.torch import build_shm_op

    compatible = deepspeed.ops.__compatible_ops__
    before = compatible.get("deepspeed_shm_comm")
    try:
        skip_shared_memory_comm_op(deepspeed)
        assert build_shm_op() is None
    finally:
        compatible["deepspeed_shm_comm"] = before


@pytest.mark.parametrize("built, age_s, removed", [
    (True, 600, True),     # built op, lock left by a dead process: removed
    (True, 5, False),      # a live process is checking the build right now: kept
    (False, 600, False),   # not built: the lock may guard a long build: kept
])
def test_stale_op_lock(tmp_path, monkeypatch, built, age_s, removed):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = tmp_path / "cpu_adam"
    folder.mkdir()
    if built:
        (folder / "cpu_adam.so").write_bytes(b"")
    lock = folder / "lock"
    lock.write_bytes(b"")
    then = time.time() - age_s
    os.utime(lock, (then, then))

    assert release_stale_op_lock("cpu_adam") is removed
    assert lock.exists() is not removed


# --- what rank 0 sends while it trains: each send runs on the training thread -----------------------


class _RecordingActor:
    """Stands in for the driver's progress actor (a Ray actor handle): records `update.remote` calls."""

    def __init__(self):
        self.calls: list[int] = []
        self.update = self

    def remote(self, key, step, metrics):
        assert key == "the-run"
        self.calls.append(step)


def test_progress_updates_are_throttled_but_evaluations_and_the_last_step_always_go():
    from orchestrator.training.worker import ProgressSender, WorkerJob

    actor = _RecordingActor()
    job = WorkerJob(spec={}, deepspeed_config={}, total_steps=100, data=None, train_examples=0, eval_examples=0, pad_id=0,
                    use_gpu=False, tracking_uri="", run_id="", progress=actor, progress_key="the-run")
    send = ProgressSender(job, rank=0, interval_s=3600)
    for step in range(0, 101):
        send(step, {"eval_loss": 1.0} if step % 50 == 0 else {"train_loss": 1.0})
    assert actor.calls == [0, 50, 100]  # within the hour only the evaluations and the last step

    every = ProgressSender(job, rank=0, interval_s=0)
    actor.calls.clear()
    for step in range(1, 6):
        every(step, {"train_loss": 1.0})
    assert actor.calls == [1, 2, 3, 4, 5]
    assert ProgressSender(job, rank=1)(100, {"eval_loss": 1.0}) is False  # other ranks never send


def test_a_training_worker_never_changes_its_environment(tmp_path, monkeypatch):
    """A training worker starts with TRAINING_WORKER_ENV (Ray's runtime env); its metric logger
    then sets no variable, and its sends set MLflow's URIs once, at the first send (before the
    logger's thread starts), never again: setenv beside the getenv of torch's, gloo's and Ray's
    threads is a data race in glibc, which killed a restarted worker with SIGSEGV."""
    import mlflow

    from orchestrator.tracking.metrics import MetricLogger
    from orchestrator.training.launch import TRAINING_WORKER_ENV

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("env")).info.run_id
    for k, v in TRAINING_WORKER_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    before = dict(os.environ)
    logger = MetricLogger(uri, run_id, flush_interval_s=3600)
    assert dict(os.environ) == before
    logger.log(1, {"train_loss": 1.0})
    assert logger.flush()
    after_first = dict(os.environ)
    assert set(after_first) - set(before) <= {"MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"}
    logger.start_background()
    for step in (2, 3):
        logger.log(step, {"train_loss": 1.0})
        logger.send()  # on the logger's thread
    assert logger.close(timeout_s=5) == []
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1, 2, 3]
    assert dict(os.environ) == after_first


def test_metric_logger_sends_on_its_interval_and_on_flush(tmp_path):
    import mlflow

    from orchestrator.tracking.metrics import MetricLogger

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("logger")).info.run_id

    def sent() -> list[int]:
        return [m.step for m in client.get_metric_history(run_id, "train_loss")]

    slow = MetricLogger(uri, run_id, flush_interval_s=3600)
    for step in range(1, 11):
        slow.log(step, {"train_loss": 1.0 / step})
    assert sent() == []  # buffered: nothing written from the training thread yet
    assert slow.flush() and sorted(sent()) == list(range(1, 11))

    eager = MetricLogger(uri, run_id, flush_interval_s=0)
    eager.log(11, {"train_loss": 0.05})
    assert sorted(sent()) == list(range(1, 12))  # past its interval: sent with the log call
    eager.log(5, {"train_loss": 9.9})  # a step the run has already: never sent twice
    assert sorted(sent()) == list(range(1, 12))


def test_metric_logger_in_the_background_never_makes_the_training_thread_wait(tmp_path):
    """Before `start_background` a send is made on the calling thread (the worker's sends before
    its first step, which pay MLflow's imports there). After it the logger sends on its own
    thread: with that thread held up (a slow MLflow server), `log` and `send` return at once and
    nothing is sent yet; what is given to `later` runs after the sends queued before it; `close`
    waits for the thread and sends the rest."""
    import threading

    import mlflow

    from orchestrator.tracking.metrics import MetricLogger

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("background")).info.run_id

    def sent() -> list[int]:
        return sorted(m.step for m in client.get_metric_history(run_id, "train_loss"))

    logger = MetricLogger(uri, run_id, flush_interval_s=0)
    logger.log(0, {"train_loss": 2.0})  # past its interval: sent now, on this thread
    assert sent() == [0]
    logger.start_background()
    held = threading.Event()
    logger.later(lambda: held.wait(10))  # the sender thread is busy until `held` is set
    for step in range(1, 4):
        logger.log(step, {"train_loss": 1.0 / step})  # past its interval: a send is queued
    logger.send()
    assert sent() == [0]  # the training thread returned without sending anything
    seen_by_later: list[list[int]] = []
    ran = threading.Event()
    logger.later(lambda: (seen_by_later.append(sent()), ran.set()))
    held.set()
    assert ran.wait(30) and seen_by_later == [[0, 1, 2, 3]]  # the send queued before it had arrived
    logger.log(4, {"train_loss": 0.25})
    assert logger.close(timeout_s=30) == [] and sent() == [0, 1, 2, 3, 4]


def test_attention_kernel_is_the_specs_and_flash_attention_is_checked(tiny_base):
    """`model.attn_implementation` reaches the loaded model; flash_attention_2 is refused where it
    cannot run (no GPU, fp32, no flash-attn package) with the field named, and a CPU load of such a
    job (generate, evaluate on a laptop) falls back to transformers' choice (sdpa here)."""
    import importlib.util

    from orchestrator.models.loading import attn_implementation, load_base
    from orchestrator.spec import SpecError, parse_spec

    base = {"name": "attn", "model": {"base": str(tiny_base), "dtype": "float32"}, "quantization": {"bits": None},
            "data": {"train": "t.jsonl"}, "training": {"max_steps": 1}}
    eager = parse_spec({**base, "model": {**base["model"], "attn_implementation": "eager"}})
    assert load_base(eager, str(tiny_base)).config._attn_implementation == "eager"
    assert load_base(parse_spec(base), str(tiny_base)).config._attn_implementation == "sdpa"  # auto on Llama

    with pytest.raises(SpecError) as refused:
        parse_spec({**base, "model": {**base["model"], "attn_implementation": "flash_attention_2"},
                    "distributed": {"use_gpu": False}})
    assert {p.path for p in refused.value.problems} == {"model.attn_implementation"}
    assert len(refused.value.problems) == 2  # no GPU, and fp32
    flash = parse_spec({**base, "model": {**base["model"], "dtype": "bfloat16", "attn_implementation": "flash_attention_2"}})
    assert attn_implementation(flash, "cpu") is None
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(SpecError, match="model.attn_implementation: flash_attention_2 needs the flash-attn"):
            attn_implementation(flash, "cuda:0")
    else:
        assert attn_implementation(flash, "cuda:0") == "flash_attention_2"
