"""The one module that talks to the Ray driver API: connect, fit a `TorchTrainer`, watch progress."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from orchestrator.planning.resources import Resources
from orchestrator.spec.checks import is_uri
from orchestrator.storage import read_json, storage_location, storage_root
from orchestrator.tracking.metrics import WORKER_MLFLOW_ENV
from orchestrator.training.checkpoint import ADAPTER_DIR, TRAIN_STATE_FILE
from orchestrator.training.worker import WorkerJob, train_loop_per_worker

# Ray Train V2, read by `ray.train` when it is imported. Set when this module is imported (before
# `run` starts any thread: setenv beside another thread's getenv is a data race in glibc).
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"

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

# Ray starts every worker process at niceness 15 (its `worker_niceness` setting), so that its own
# processes stay responsive. A training worker is the job's whole point: at niceness 15 it gets a
# fraction of a core whenever anything else on the node runs (a data loader, another user's job,
# a test suite), where a script run by hand (HF Trainer, torchrun) runs at 0. On a shared 2-core
# machine this alone made a step 1.7-1.9x slower than HF Trainer's (docs/benchmarks.md). Only the
# training workers get it (Ray Train's controller and helper actors stay as Ray starts them); a
# value set in the environment wins. They also start with what their MLflow calls need
# (`WORKER_MLFLOW_ENV`: a worker must not change its environment while its threads run).
TRAINING_WORKER_ENV = {"RAY_worker_niceness": os.environ.get("RAY_worker_niceness", "0"),
                       **{k: os.environ.get(k, v) for k, v in WORKER_MLFLOW_ENV.items()}}


@dataclass
class FitResult:
    """Where a run's outputs are: local paths, or URIs when `storage.path` is a bucket."""

    adapter_dir: str  # the final checkpoint's adapter (or trained weights)
    metrics: dict
    storage_dir: str  # Ray Train's directory of the run
    checkpoint_dir: str = ""


def latest_checkpoint(storage_path: str, name: str) -> tuple[int, str] | None:
    """(step, directory) of the latest checkpoint Ray Train recorded for the run `name` (the one
    a `fit` under that name resumes from); None when there is none. In remote storage
    (s3://bucket/prefix) the directory is a URI, readable with `read_json`."""
    run_dir = storage_location(storage_root(storage_path), name)
    snapshot = read_json(storage_location(run_dir, "checkpoint_manager_snapshot.json")) or {}
    latest = snapshot.get("latest_checkpoint_result") or {}
    if not latest.get("checkpoint_dir_name"):
        return None
    directory = storage_location(run_dir, latest["checkpoint_dir_name"])
    state = read_json(storage_location(directory, TRAIN_STATE_FILE))
    return (state["step"], directory) if state else None


def connect(address: str | None = None, verbose: bool = False, dashboard: bool = False) -> float:
    """Start a new local Ray instance (or join the cluster at `address`); returns its GPU count.

    With no address this never attaches to some other Ray instance that happens to run here.
    `dashboard`: start the dashboard's state API with a local instance. A search needs it: when
    Tune stops a trial early it kills the trial's Train controller, and Ray Train's cleaner asks
    the state API whether the controller died before it frees the trial's workers' placement
    group (without it, the stopped trial's CPUs stay reserved and later trials wait forever)."""
    import ray

    if not ray.is_initialized():
        env, extra = dict(WORKER_ENV), {}
        if address is None:
            # Ray Train watches the nodes for preemption (a drained spot node) with an actor per
            # run, a process that costs about 2 s of CPU; a local instance is this one machine.
            env[PREEMPTION_WATCHER] = os.environ.get(PREEMPTION_WATCHER, "0")
        if dashboard and address is None:
            # Ray's workers find the state API by looking for "the" Ray instance on this machine,
            # and give up when there are several (other users' tests, a cluster); so the
            # dashboard gets a port chosen here, and every worker is told where it is.
            port = _free_port()
            extra = {"dashboard_host": "127.0.0.1", "dashboard_port": port}
            env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(address=address or "local", log_to_driver=verbose, include_dashboard=dashboard,
                 logging_level="ERROR" if not verbose else "INFO",
                 runtime_env={"env_vars": env}, **extra)
    return float(ray.cluster_resources().get("GPU", 0.0))


def cluster_info():
    """The connected Ray cluster as `submission.cluster_info` reads it: alive nodes, CPUs, GPUs."""
    import ray

    from orchestrator.cluster.submission import cluster_info

    return cluster_info([n.get("Resources") or {} for n in ray.nodes() if n.get("Alive")])


def cluster_gpu_memory(timeout_s: float = 120.0) -> tuple[int, str] | None:
    """(bytes, name) of a GPU the job's workers will get, asked of the cluster: a task that takes
    one GPU, as a worker does, reads its size. None where the cluster has no GPU or none frees up
    within `timeout_s` (the plan then keeps the driver's figure). One task: a cluster of mixed GPU
    sizes is planned against the one it lands on."""
    import ray

    if not ray.cluster_resources().get("GPU"):
        return None

    @ray.remote(num_gpus=1, num_cpus=0)
    def gpu_size() -> tuple[int, str]:
        import torch

        props = torch.cuda.get_device_properties(0)
        return int(props.total_memory), props.name

    ref = gpu_size.remote()
    try:
        return ray.get(ref, timeout=timeout_s)
    except Exception:  # no GPU free in time, or no CUDA where Ray saw a GPU: plan as before
        ray.cancel(ref, force=True)
        return None


def is_connected() -> bool:
    """Whether this process already has a Ray instance (an earlier run of `compare`, a test session)."""
    import ray

    return ray.is_initialized()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cluster_capacity() -> dict[str, float]:
    """CPUs and GPUs of the connected Ray cluster (as it is now)."""
    import ray

    total = ray.cluster_resources()
    return {"CPU": float(total.get("CPU", 0.0)), "GPU": float(total.get("GPU", 0.0))}


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _tune_report_callback():
    from ray.tune.integration.ray_train import TuneReportCallback

    return TuneReportCallback()


def _trainer_class():
    """Ray Train's `TorchTrainer`, without the callback that serves Ray Datasets to the workers
    when none is passed (ours read their rows themselves, see `fit`). Ray Train adds it to every
    run, and it starts an actor process and makes each worker import Ray Data before the training
    function starts: some 1-1.5 s of every run's start on 2 cores (benchmarks/run.py's fixed
    overhead). Where a Ray release no longer has it, the plain `TorchTrainer`."""
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks import DatasetsCallback
    except ImportError:
        return TorchTrainer

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            return callbacks if self.datasets else [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    return Trainer


# The driver's progress actor, created at its first run and shared by every later run of this
# process's Ray connection (a search's trial, a test session, `compare`): a new actor per run is a
# process that imports Ray, about 1.2 s of CPU. ((this node's id, the Ray job's id), handle): a
# Ray instance started again in the same process numbers its jobs from 1 again, its node is new.
_progress: tuple[tuple[str, str], object] | None = None


def _progress_actor():
    """The actor rank 0 sends its progress to, by run (`WorkerJob.progress_key`)."""
    global _progress
    import ray

    context = ray.get_runtime_context()
    connection = (context.get_node_id(), context.get_job_id())
    if _progress is not None and _progress[0] == connection:
        return _progress[1]

    @ray.remote(num_cpus=0)
    class Progress:
        """Rank 0 pushes (step, metrics) here, by run; the driver polls it for its progress bar."""

        def __init__(self):
            self.runs: dict[str, tuple[int, dict]] = {}

        def update(self, key: str, step: int, metrics: dict) -> None:
            self.runs[key] = (step, metrics)

        def get(self, key: str) -> tuple[int, dict]:
            return self.runs.get(key, (0, {}))

        def forget(self, key: str) -> None:
            self.runs.pop(key, None)

    _progress = (connection, Progress.remote())
    return _progress[1]


def fit(job: WorkerJob, *, name: str, resources: Resources, storage_path: str, max_failures: int,
        on_progress: Callable[[int, dict], None] | None = None, in_tune: bool = False) -> FitResult:
    """Run the worker loop on `resources.num_workers` Ray Train workers and wait for it.

    Ray Train keeps the run's checkpoints under `storage_path/name`: a worker group restarted
    after a failure, or a later `fit` under the same name, continues from the latest one.
    `in_tune`: this is a trial of a search (called inside a Tune function), so rank 0's reports
    are forwarded to Tune, whose scheduler may stop the trial (and with it these workers).

    Every worker reads the tokenized rows (`job.data`) straight from their Parquet files, whole
    and in their stored order: each rank keeps every world-th row itself (`steps.micro_batches`),
    so which rows a rank trains on follows from the step alone. (Ray Data's split, Ray Train's
    `datasets=`, hands blocks to whichever worker asks first, which no resumed run could repeat.)"""
    import ray
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchConfig

    progress = _progress_actor()
    job.progress, job.progress_key = progress, name
    storage = storage_root(storage_path)
    trainer = _trainer_class()(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=resources.scaling_config(),
        torch_config=TorchConfig(backend="nccl" if resources.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=max_failures),
                             worker_runtime_env={"env_vars": TRAINING_WORKER_ENV},
                             callbacks=[_tune_report_callback()] if in_tune else None),
    )
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.5):
            try:
                step, metrics = ray.get(progress.get.remote(name), timeout=5)
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
        progress.forget.remote(name)
    if result.checkpoint is None:  # the workers ended without one (tokenizing beside them failed)
        raise RuntimeError(f"the training run {name} ended without a checkpoint")
    if on_progress:
        on_progress(job.total_steps, result.metrics or {})
    # Where Ray Train keeps the checkpoint: a URI in remote storage (`storage.local_copy` fetches
    # what the driver needs of it), never downloaded whole (it holds the optimizer state too).
    checkpoint_dir = (storage_location(storage, name, Path(result.checkpoint.path).name) if is_uri(storage)
                      else result.checkpoint.path)
    return FitResult(adapter_dir=storage_location(checkpoint_dir, ADAPTER_DIR),
                     metrics=dict(result.metrics or {}), storage_dir=storage_location(storage, name),
                     checkpoint_dir=checkpoint_dir)


# --- hyperparameter search: Ray Tune drives one TorchTrainer per trial -------------------------

# The listener of the search running in this driver: (event, trial_id, config, result). Tune
# pickles its callbacks with the experiment (to restore it), so the callback below holds no
# reference to the driver's state and looks the listener up here instead.
_search_listener: Callable[[str, str, dict, dict], None] | None = None


def _search_callback():
    from ray.tune import Callback

    class SearchEvents(Callback):
        """Forwards Tune's trial events on the driver to `_search_listener`."""

        def __reduce__(self):
            # Pickled with the experiment as "call _search_callback()", never by value (by value,
            # cloudpickle would take the listener and the driver's console along).
            return _search_callback, ()

        def _send(self, event: str, trial, result: dict | None = None) -> None:
            if _search_listener is not None:
                _search_listener(event, trial.trial_id, dict(trial.config),
                                 dict(result if result is not None else trial.last_result or {}))

        def on_trial_start(self, iteration, trials, trial, **info):
            self._send("start", trial)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self._send("result", trial, result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._send("complete", trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._send("error", trial)

    return SearchEvents()


def trial_id() -> str:
    """The id of the Tune trial this code runs in."""
    from ray import tune

    return tune.get_context().get_trial_id()


@dataclass
class SearchSetup:
    """How Tune runs the search: everything but the trial function and its parameters."""

    metric: str
    mode: str
    num_samples: int
    max_concurrent_trials: int | None
    scheduler: str  # asha or none
    grace_period: int  # evaluations
    reduction_factor: float
    max_evaluations: int  # ASHA's max_t: the evaluations of a trial that runs to its end
    search_alg: str  # optuna or random
    seed: int | None
    time_budget_s: float | None


def asha_scheduler(**kwargs):
    """Ray Tune's ASHA, except that a trial's last evaluation is never a reason to stop it.

    ASHA puts a rung at every grace_period x reduction_factor^k evaluations, and one can fall on
    a trial's last evaluation (4 of 4). Stopping a trial there saves no step, and Tune would kill
    the trial while its Train run is finishing; so a result whose `step` is its `total_steps`
    (every report carries both) is recorded in its rung but never stopped."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class LastEvaluationASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            action = super().on_trial_result(tune_controller, trial, result)
            step, total = result.get("step"), result.get("total_steps")
            last = step is not None and total is not None and step >= total
            return TrialScheduler.CONTINUE if last else action

    return LastEvaluationASHA(**kwargs)


def search_dir(storage_path: str, name: str) -> str:
    """Where Tune keeps the search `name` (a local path or a URI): under `storage.path`."""
    return storage_location(storage_root(storage_path), name)


def tune(trial_fn: Callable, trial_params: dict, *, param_space: dict, setup: SearchSetup, name: str,
         storage_path: str, on_event: Callable[[str, str, dict, dict], None]) -> list[dict]:
    """Run (or resume, when `storage_path/name` holds an unfinished one) a Tune search whose
    trials call `trial_fn(config, **trial_params)`; returns one dict per trial: `trial_id`,
    `config`, `last_result`, `error` (or None)."""
    global _search_listener

    import ray
    from ray import tune as rt
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Tune saves the experiment state at most this often (seconds); a small search is cheap to
    # save, and a fresh state means a resumed search re-runs no trial that had finished.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # Tune's own console reporter (experiment box, trial tables) would interleave with ours.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = search_dir(storage_path, name)
    # The trial function only drives its TorchTrainer: the workers hold the CPUs (or GPUs), so the
    # function asks for none (even 0.01 CPU each would leave 2 trials x 1 worker x 1 CPU short of
    # a 2-CPU machine) and `max_concurrent_trials` limits how many run at once. A trial's bundle
    # cannot be empty, so it holds a token 1 MiB of Ray's `memory` resource.
    trainable = rt.with_resources(rt.with_parameters(trial_fn, **trial_params), {"CPU": 0, "memory": 1 << 20})
    _search_listener = on_event
    try:
        if rt.Tuner.can_restore(path):
            tuner = rt.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                     param_space=param_space)
        else:
            if setup.scheduler == "asha":
                # max_t one past the last evaluation: ASHA stops a trial that reaches max_t, and a
                # trial that has trained to its end should return by itself (its Train controller
                # then shuts its workers down in order, rather than being killed with the trial).
                scheduler = asha_scheduler(time_attr="training_iteration", max_t=setup.max_evaluations + 1,
                                           grace_period=min(setup.grace_period, setup.max_evaluations),
                                           reduction_factor=setup.reduction_factor)
            else:
                scheduler = FIFOScheduler()
            if setup.search_alg == "optuna":
                from ray.tune.search.optuna import OptunaSearch

                search_alg = OptunaSearch(seed=setup.seed)
            else:
                # Tune applies max_concurrent_trials to a Searcher (Optuna) but not to this one.
                search_alg = BasicVariantGenerator(random_state=setup.seed,
                                                   max_concurrent=setup.max_concurrent_trials or 0)
            tuner = rt.Tuner(
                trainable, param_space=param_space,
                tune_config=rt.TuneConfig(metric=setup.metric, mode=setup.mode, num_samples=setup.num_samples,
                                          max_concurrent_trials=setup.max_concurrent_trials,
                                          scheduler=scheduler, search_alg=search_alg,
                                          time_budget_s=setup.time_budget_s),
                run_config=rt.RunConfig(name=name, storage_path=storage_root(storage_path), verbose=0,
                                        callbacks=[_search_callback()],
                                        failure_config=ray.tune.FailureConfig(max_failures=0)))
        grid = tuner.fit()
    finally:
        _search_listener = None
    # Tune puts the trial id in every result; a trial that failed before reporting has none (the
    # caller knows it from the "error" event).
    return [{"trial_id": str((r.metrics or {}).get("trial_id") or ""), "config": dict(r.config or {}),
             "last_result": dict(r.metrics or {}), "error": str(r.error) if r.error else None} for r in grid]
