"""The one module that talks to the Ray driver API: connect, fit a `TorchTrainer`, watch progress."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from orchestrator.plan import Resources
from orchestrator.train_loop import ADAPTER_DIR, TRAIN_STATE_FILE, WorkerJob, train_loop_per_worker

# Quiet third-party chatter in the workers; our own progress and summary are what users read.
WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "PYTHONWARNINGS": "ignore",
    "RAY_TRAIN_V2_ENABLED": "1",
    # Ray Train's controller collects reports and notices the end of training when it polls the
    # workers, every 2 s by default; a worker's report waits while the previous one is unread.
    # Polling every 0.5 s makes frequent reports (a search's evaluations) and the end of a run
    # cheaper, for four small actor calls a second (a value set in the environment wins).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
}


@dataclass
class FitResult:
    adapter_dir: str
    metrics: dict
    storage_dir: str
    checkpoint_dir: str = ""


def _storage(storage_path: str) -> str:
    # A URI (s3://bucket/prefix) is Ray Train's to resolve; a local path is made absolute.
    return storage_path if "://" in storage_path else str(Path(storage_path).resolve())


def latest_checkpoint(storage_path: str, name: str) -> tuple[int, str] | None:
    """(step, directory) of the latest checkpoint Ray Train recorded for the run `name` (the one
    a `fit` under that name resumes from); None when there is none, or the storage is remote."""
    import json

    run_dir = Path(_storage(storage_path)) / name
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if "://" in storage_path or not snapshot.is_file():
        return None
    latest = json.loads(snapshot.read_text(encoding="utf-8")).get("latest_checkpoint_result") or {}
    directory = run_dir / str(latest.get("checkpoint_dir_name"))
    state = directory / TRAIN_STATE_FILE
    return (json.loads(state.read_text(encoding="utf-8"))["step"], str(directory)) if state.is_file() else None


def connect(address: str | None = None, verbose: bool = False) -> float:
    """Start a new local Ray instance (or join the cluster at `address`); returns its GPU count.

    With no address this never attaches to some other Ray instance that happens to run here."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
        ray.init(address=address or "local", log_to_driver=verbose, include_dashboard=False,
                 logging_level="ERROR" if not verbose else "INFO",
                 runtime_env={"env_vars": WORKER_ENV})
    return float(ray.cluster_resources().get("GPU", 0.0))


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _progress_actor():
    import ray

    @ray.remote(num_cpus=0)
    class Progress:
        """Rank 0 pushes (step, metrics) here; the driver polls it for its progress bar."""

        def __init__(self):
            self.step, self.metrics = 0, {}

        def update(self, step: int, metrics: dict) -> None:
            self.step, self.metrics = step, metrics

        def get(self) -> tuple[int, dict]:
            return self.step, self.metrics

    return Progress.remote()


def fit(job: WorkerJob, *, name: str, resources: Resources, storage_path: str, max_failures: int,
        on_progress: Callable[[int, dict], None] | None = None) -> FitResult:
    """Run the worker loop on `resources.num_workers` Ray Train workers and wait for it.

    Ray Train keeps the run's checkpoints under `storage_path/name`: a worker group restarted
    after a failure, or a later `fit` under the same name, continues from the latest one."""
    import ray
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    progress = _progress_actor()
    job.progress = progress
    storage = _storage(storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=resources.scaling_config(),
        torch_config=TorchConfig(backend="nccl" if resources.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.5):
            try:
                step, metrics = ray.get(progress.get.remote(), timeout=5)
            except Exception:  # the actor is gone at shutdown; the bar simply stops
                return
            if on_progress:
                on_progress(step, metrics)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = trainer.fit()
    finally:
        stop.set()
        watcher.join(timeout=2)
        ray.kill(progress)
    if on_progress:
        on_progress(job.total_steps, result.metrics or {})
    # A checkpoint in remote storage is downloaded, so the adapter can be registered from here.
    checkpoint_dir = result.checkpoint.to_directory() if "://" in storage else result.checkpoint.path
    return FitResult(adapter_dir=os.path.join(checkpoint_dir, ADAPTER_DIR),
                     metrics=dict(result.metrics or {}), storage_dir=os.path.join(storage, name),
                     checkpoint_dir=checkpoint_dir)
