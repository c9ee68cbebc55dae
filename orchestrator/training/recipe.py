"""`orchestrator run`: spec -> plan -> launch -> train (workers) -> track -> register -> summary.

A job with a `tune` section is a search (`search.recipe`), which uses `prepare`, `RunSummary` and
`lineage_of` from here; this module never imports search."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from orchestrator.spec import JobSpec, Problem, SpecError, redact_uri
from orchestrator.storage import check_reachable as check_storage
from orchestrator.storage import local_copy, read_json, storage_location, storage_root
from orchestrator.timing import Stopwatch

StatusFn = Callable[[str], None]
ProgressFn = Callable[[str, int, int | None, dict], None]  # (task, done, total (None: not known), metrics)


class DoesNotFit(Exception):
    """The memory plan says the job cannot fit the GPUs it would get."""

    def __init__(self, plan):
        self.plan = plan
        super().__init__("the job does not fit the GPU memory it would get")


@dataclass
class RunSummary:
    run_id: str
    experiment: str
    tracking_uri: str
    metrics: dict
    registered_model: dict
    data: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)  # seconds per phase, see `phase_timings`
    # The memory plan's counts, and what the run measured: its peak memory, the size of what it
    # saved and where that is (a local path, or a URI in a bucket). `orchestrator compare` reads them.
    planned: dict = field(default_factory=dict)
    measured: dict = field(default_factory=dict)
    trials: list[dict] | None = None  # a search: every trial, ranked (best first)

    def to_json(self) -> dict:
        out = {"run_id": self.run_id, "experiment": self.experiment, "metrics": self.metrics,
               "registered_model": self.registered_model, "data": self.data, "timings": self.timings,
               "planned": self.planned, "measured": self.measured}
        return out if self.trials is None else {**out, "trials": self.trials}


# The phases of a run, in order, as `phase_timings` names them.
PHASES = ("resolve_base", "data", "ray_start", "plan", "tracking_start", "worker_start", "setup", "eval",
          "steps", "log", "report", "checkpoint", "finish", "sync_tracking", "register")


def phase_timings(driver: dict[str, float], fit_started_at: float, fit_s: float, worker: dict) -> dict:
    """Seconds per phase of a whole run: the driver's own phases plus the split of `fit` into
    starting the workers, rank 0's phases (its `time_<phase>_s` metrics) and finishing (the final
    checkpoint and report, and stopping the workers). Pure; `total` is their sum."""
    out = {k: v for k, v in driver.items() if k != "fit"}
    loop = worker.get("worker_loop_s")
    started = worker.get("worker_started_at")
    if loop is not None and started is not None:
        out["worker_start"] = max(0.0, started - fit_started_at)
        out["finish"] = max(0.0, fit_started_at + fit_s - started - loop)
    for key, value in worker.items():
        if key.startswith("time_") and key.endswith("_s"):
            out[key[len("time_"):-len("_s")]] = value
    ordered = {p: round(out[p], 2) for p in PHASES if p in out}
    ordered["total"] = round(sum(ordered.values()), 2)
    return ordered


def mean_tokens_per_s(worker: dict) -> float | None:
    """Training throughput over the whole run (all workers): tokens trained per second of
    training steps; the last step's own figure when the totals are missing."""
    tokens, seconds = worker.get("tokens_trained"), worker.get("time_steps_s")
    return tokens / seconds if tokens and seconds else worker.get("tokens_per_s")


def lineage_of(spec: JobSpec, base_path: str, data_sha256: dict[str, str]) -> dict:
    """What a trained model came from, beyond the spec: the base and the sha256 of its weights
    (checked when an adapter is loaded) and the sha256 of each data file (`DataSets.files_sha256`)."""
    from orchestrator.models.loading import base_sha256

    return {"base": spec.model.base, "base_revision": spec.model.revision,
            "base_sha256": base_sha256(spec.model, base_path), "data": dict(data_sha256)}


@dataclass
class Prepared:
    """What every run of a job needs before it trains: the base, the tokenized data (with the
    tokenizer's padding id), the Ray resources of one run and the memory plan."""

    base_path: str
    data: object
    gpus: float
    resources: object
    memory: object
    # Tokenizing still running beside training (`data.train_while_tokenizing`): `data` is read as
    # it is written; `tokenizing.wait()` gives the finished data and its counts.
    tokenizing: object = None


def trains_while_tokenizing(spec: JobSpec, large_source: bool) -> bool:
    """Whether a run may start training before its data is all tokenized: asked for
    (`data.train_while_tokenizing`), no count needed up front (`training.max_steps`), and a source
    worth it (`large_source`: tokenized by Ray Data; a small one takes a second or two, and its
    problems are better found before anything starts)."""
    return spec.data.train_while_tokenizing and spec.training.max_steps is not None and large_source


def report_data(spec: JobSpec, data, status: StatusFn, check: bool = True) -> None:
    """Say what tokenizing cut or left out, and (`check`) refuse data too small for one step (`SpecError`)."""
    from orchestrator.planning.steps import examples_per_step

    if data.stats["truncated_examples"]:
        status(f"{data.stats['truncated_examples']} example(s) longer than data.max_seq_len="
               f"{spec.data.max_seq_len} truncated (data.too_long=error refuses them instead)")
    if data.stats.get("dropped_examples"):
        status(f"{data.stats['dropped_examples']} example(s) left out: nothing to train on (a response "
               f"truncated away, or empty)")
    workers = spec.distributed.num_workers
    needed = examples_per_step(spec, workers) // spec.training.grad_accum
    if check and data.train_examples < needed:
        raise SpecError([Problem(
            path="training.micro_batch_size",
            message=f"{data.train_examples} training examples cannot fill one micro batch on each of "
                    f"{workers} workers ({needed} needed)",
            fix="add data, or lower training.micro_batch_size or distributed.num_workers")])


def prepare(spec: JobSpec, *, address: str | None, verbose: bool, force: bool, gpu_memory_bytes: int | None,
            status: StatusFn, progress: ProgressFn | None, watch: Stopwatch | None = None,
            stream: bool = False) -> Prepared:
    """Check what can be checked before any worker starts (the MLflow server, the base's files,
    the data, enough of it for one step on every worker, target modules and the memory plan),
    then connect to Ray and check the GPUs. Raises `SpecError` or `DoesNotFit`.

    `stream`: the caller can train while the data is tokenized (`trains_while_tokenizing`); then,
    on one node, a large source not in the cache is tokenized in the background (by Ray Data on
    the CPUs the workers leave free, or on the driver) and `Prepared.tokenizing` is set."""
    from orchestrator.data.cache import prepare_datasets, shared, start_tokenizing
    from orchestrator.data.pipeline import is_large
    from orchestrator.data.sources import resolve_source
    from orchestrator.models.loading import check_base_files, resolve_base
    from orchestrator.planning.budget import plan_for_run
    from orchestrator.planning.resources import resources
    from orchestrator.planning.units import human
    from orchestrator.tracking import runs
    from orchestrator.training import launch

    watch = watch or Stopwatch()
    with watch("tracking_start"):
        runs.check_reachable(spec.tracking.uri)
    check_storage(spec.storage.path)
    status(f"Resolving base model {spec.model.base}")
    with watch("resolve_base"):
        base_path = resolve_base(spec.model, progress=(lambda i, n: progress("pre-training built-in base", i, n, {}))
                                 if progress else None)
        check_base_files(base_path, spec.model.revision)

    status("Preparing data")

    def connect() -> None:  # a large or remote source is tokenized by Ray Data, on the cluster
        if not launch.is_connected():
            status("Connecting to Ray" if address else "Starting Ray")
        launch.connect(address, verbose, dashboard=spec.tune is not None)

    workers = spec.distributed.num_workers
    with watch("data"):
        # Tokenized data is cached by everything it depends on: a job run again loads no tokenizer.
        tokenizing = None
        if stream and trains_while_tokenizing(spec, is_large(resolve_source(spec.data.train, "data.train"))):
            connect()
            info = launch.cluster_info()
            if address is None or not info.workers_may_span_nodes(spec):  # else: copied whole to shared storage
                spare = info.cpus - workers * spec.distributed.cpus_per_worker  # what the workers leave
                tokenizing = start_tokenizing(spec.data, spec.training.seed, base_path, spec.model.trust_remote_code,
                                              revision=spec.model.revision, use_ray=None if spare >= 1 else False,
                                              connect=connect, ray_cpus=spare)
        if tokenizing is None:
            data, cached = prepare_datasets(spec.data, spec.training.seed, base_path, spec.model.trust_remote_code,
                                            revision=spec.model.revision, connect=connect)
        else:
            data, cached = tokenizing.data, tokenizing.cached
            if cached is None:
                status(f"Tokenizing {spec.data.train} while training (data.train_while_tokenizing): "
                       + ("Ray Data on the CPUs the workers leave free" if spare >= 1
                          else "on this machine, since the workers take every CPU of the cluster"))
            else:
                tokenizing = None
    if cached:
        status(f"Tokenized data from the cache: {cached}")
    if tokenizing is None:
        report_data(spec, data, status)
    try:
        # The plan also resolves peft.target_modules against the model's modules (a SpecError).
        with watch("plan"):
            memory = plan_for_run(spec, workers, gpu_memory_bytes)

        if not launch.is_connected():
            status("Connecting to Ray" if address else "Starting Ray")
        # Starting Ray mostly waits on the processes it spawns; opening the MLflow store (importing
        # MLflow, creating a new sqlite file's tables) uses that time instead of following it.
        store = threading.Thread(target=runs.open_store, args=(spec.tracking.uri,), daemon=True)
        store.start()
        with watch("ray_start"):
            gpus = launch.connect(address, verbose, dashboard=spec.tune is not None)
            store.join()
        res = resources(spec, gpus_available=gpus)
        if res.use_gpu and gpu_memory_bytes is None and (workers_gpu := launch.cluster_gpu_memory()):
            # Planned again against the GPUs the workers get, not the driver's (a laptop, a CPU head node).
            memory = plan_for_run(spec, workers, workers_gpu[0], source=f"the workers' GPU ({workers_gpu[1]})")
        if res.use_gpu:
            status(f"Memory plan: {human(memory.total_bytes)} of {human(memory.gpu_memory_bytes)} per GPU "
                   f"({memory.gpu_memory_source})")
            if not memory.fits and not force:
                raise DoesNotFit(memory)
            if address is None and gpus < res.num_workers:
                # A local Ray instance never grows: Ray Train would wait for GPUs forever.
                raise SpecError([Problem(
                    path="distributed.use_gpu",
                    message=f"the job asks for {res.num_workers} GPU worker(s) but this machine has {gpus:g} GPU(s)",
                    fix="set distributed.use_gpu=auto (or false), or lower distributed.num_workers")])
        if tokenizing is None and address is not None and launch.cluster_info().workers_may_span_nodes(spec):
            # Workers on other nodes cannot read this machine's cache: the rows go where checkpoints go.
            # (A local Ray instance is one node and never grows.)
            data = shared(data, storage_root(spec.storage.path))
            status(f"Tokenized data shared with the cluster's nodes: {data.path}")
    except BaseException:
        if tokenizing is not None:
            tokenizing.close()  # stopped, its files removed
        raise
    return Prepared(base_path=base_path, data=data, gpus=gpus, resources=res, memory=memory, tokenizing=tokenizing)


def run_job(spec: JobSpec, *, address: str | None = None, verbose: bool = False, force: bool = False,
            gpu_memory_bytes: int | None = None, restart: bool = False, report_evals: bool = False,
            register: bool = True, parent_run_id: str | None = None,
            status: StatusFn = lambda _: None, progress: ProgressFn | None = None) -> RunSummary:
    """Run a job end to end and return its summary. Raises `SpecError` for problems with the
    job found before any worker starts (data, model, sizes, an unreachable MLflow server), and
    `DoesNotFit` when the memory plan says a GPU job cannot fit (unless `force`).

    A job whose latest MLflow run stopped unfinished (driver killed, node lost) continues that
    run from its last checkpoint, unless `restart`. `report_evals` reports every evaluation to
    Ray Train, not only checkpoints. With `register=False` the trained weights stay in
    `storage.path` only; `parent_run_id` nests the MLflow run under that run.

    A job with a `tune` section is a search: `search.recipe.run_spec` runs it (`run_search`), since
    training sits below search; here it is a `ValueError`."""
    from orchestrator.planning.deepspeed import deepspeed_config
    from orchestrator.planning.steps import optimizer_steps
    from orchestrator.tracking import registry, runs
    from orchestrator.training import launch
    from orchestrator.training.worker import WorkerJob

    if spec.tune is not None:  # search.recipe.run_spec dispatches a search (this package sits below search)
        raise ValueError(f"job '{spec.name}' has a tune section: run it with orchestrator.search.recipe.run_spec")
    started = time.time()
    watch = Stopwatch()
    p = prepare(spec, address=address, verbose=verbose, force=force, gpu_memory_bytes=gpu_memory_bytes,
                status=status, progress=progress, watch=watch, stream=True)
    try:
        base_path, data, res, memory = p.base_path, p.data, p.resources, p.memory
        total = optimizer_steps(spec, data.train_examples, res.num_workers)
        ds_config = deepspeed_config(spec, world_size=res.num_workers, use_gpu=res.use_gpu, total_steps=total,
                                     trainable_params=memory.params.trainable, largest_param=memory.params.largest,
                                     hidden_size=memory.architecture.hidden_size)

        with watch("plan"):
            lineage = lineage_of(spec, base_path, data.files_sha256)
        with watch("tracking_start"):
            handle = runs.resumable_run(spec)
        if handle is not None and restart:
            status(f"Starting afresh (--restart); the stopped MLflow run {handle.run_id} is marked KILLED")
            runs.finish_run(handle, "KILLED")
            handle = None
        if handle is not None:
            # Ray Train finds the run's checkpoints under the same name and storage path.
            latest = launch.latest_checkpoint(spec.storage.path, ray_run_name(spec, handle.run_id))
            where = f"its checkpoint at step {latest[0]} of {total}" if latest else "step 0 (it saved no checkpoint)"
            status(f"Resuming the stopped MLflow run {handle.run_id} from {where}; pass --restart to start afresh")
            runs.reopen_run(handle)
            if latest:  # metrics a previous attempt could not send
                sync_tracking(spec, handle, latest[1])
        else:
            with watch("tracking_start"):
                handle = runs.start_run(
                    spec, tags={"total_steps": str(total), "num_workers": str(res.num_workers),
                                "use_gpu": str(res.use_gpu), "zero_stage": str(spec.distributed.deepspeed.stage),
                                "peft_method": spec.peft.method, **runs.lineage_tags(lineage),
                                **runs.parent_tags(parent_run_id)},
                    artifacts={"deepspeed_config.json": ds_config, "memory_plan.json": memory.to_json(),
                               **({"data_stats.json": data.stats} if data.complete else {})})
                runs.log_metrics(handle, {"planned_gpu_bytes": memory.total_bytes}, step=0)
        status(f"MLflow run {handle.run_id} in experiment '{handle.experiment}'")
        try:
            job = WorkerJob(spec=spec.model_dump(mode="json"), deepspeed_config=ds_config, total_steps=total,
                            data=data, train_examples=data.train_examples,
                            # Not counted yet while tokenizing, but none at all without an eval split.
                            eval_examples=data.stats.get("eval_examples", None if spec.data.eval else 0),
                            pad_id=data.pad_id, use_gpu=res.use_gpu,
                            tracking_uri=handle.uri, run_id=handle.run_id, report_evals=report_evals,
                            generation_records=generation_records(spec))
            status(f"Training {total} steps on {res.num_workers} worker(s), "
                   f"ZeRO stage {spec.distributed.deepspeed.stage}")
            fit_started_at = time.time()
            try:
                with watch("fit"):
                    fit = launch.fit(job, name=ray_run_name(spec, handle.run_id), resources=res,
                                     storage_path=spec.storage.path, max_failures=spec.distributed.max_failures,
                                     on_progress=(lambda step, m: progress("training", step, total, m)) if progress else None)
            except Exception:
                if p.tokenizing is not None and (problem := p.tokenizing.problem()) is not None:
                    raise problem from None  # the workers stopped because tokenizing did: its problem is the person's
                raise
            with watch("sync_tracking"):
                sync_tracking(spec, handle, fit.checkpoint_dir)
            if p.tokenizing is not None:
                if p.tokenizing.running:
                    status("Training done; tokenizing the rest of the data for the cache and the run's counts")
                data = p.tokenizing.wait((lambda n: progress("tokenizing (records)", n, None, {})) if progress else None)
                report_data(spec, data, status, check=False)
                runs.log_artifacts(handle, {"data_stats.json": data.stats})
            version = None
            with local_copy(fit.adapter_dir, fetch_progress(progress)) as adapter_dir:  # from a bucket, then removed
                artifact_bytes = registry.dir_size(adapter_dir)
                if register:
                    what = {"full": "full model", "freeze": "changed weights"}.get(spec.peft.method, "adapter")
                    what = {"adapter": what, "merged": "merged model", "both": f"{what} and the merged model"}[spec.registry.mode]
                    status(f"Registering the {what} as '{spec.registered_name}'")
                    with watch("register"):
                        version = registry.register_trained(handle, spec, adapter_dir, lineage=lineage,
                                                            tags={"spec_hash": spec.spec_hash(), "base_model": spec.model.base})
            timings = phase_timings(watch.seconds, fit_started_at, watch.seconds["fit"], fit.metrics)
            wall = time.time() - started
            metrics = {"base_eval_loss": fit.metrics.get("base_eval_loss"), "eval_loss": fit.metrics.get("eval_loss"),
                       "train_loss": fit.metrics.get("train_loss"), "tokens_per_s": mean_tokens_per_s(fit.metrics),
                       "tokens_trained": fit.metrics.get("tokens_trained"),
                       "real_token_share": fit.metrics.get("real_token_share"), "wall_s": round(wall, 1)}
            measured = {"peak_memory_bytes": fit.metrics.get("peak_memory_bytes"), "artifact_bytes": artifact_bytes,
                        "artifact_dir": fit.adapter_dir}
            runs.log_metrics(handle, {"wall_s": wall, "final_eval_loss": metrics["eval_loss"],
                                          "artifact_bytes": artifact_bytes,
                                          **{f"time_{k}_s": v for k, v in timings.items()}}, step=total)
            if version:
                runs.set_tags(handle, {"registered_model": version.uri, "registered_version": version.version})
            runs.finish_run(handle, "FINISHED")
        except BaseException:
            with contextlib.suppress(Exception):  # the server may be the thing that failed
                runs.finish_run(handle, "FAILED")
            raise
        metrics = {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in metrics.items()}
        return RunSummary(run_id=handle.run_id, experiment=handle.experiment, tracking_uri=handle.uri,
                          metrics=metrics, data=data.stats, timings=timings,
                          registered_model={**asdict(version), "uri": version.uri} if version else {},
                          planned={"total_params": memory.params.total, "trainable_params": memory.params.trainable,
                                   "peak_bytes": memory.total_bytes, "world_size": res.num_workers},
                          measured=measured)
    finally:
        if p.tokenizing is not None:
            p.tokenizing.close()  # into the cache once the workers no longer read it (stopped if the run failed)


def fetch_progress(progress: ProgressFn | None) -> Callable[[int, int], None] | None:
    """`storage.local_copy`'s progress in a run's progress display: MiB fetched from a bucket."""
    if progress is None:
        return None
    mib = lambda n: -(-n >> 20)  # noqa: E731 (rounded up: a small adapter is 1 MiB, not 0)
    return lambda done, total: progress("fetching from storage.path (MiB)", mib(done), mib(total), {})


def generation_records(spec: JobSpec) -> list[dict]:
    """The first `training.generations` eval records (the same ones at every evaluation)."""
    from orchestrator.data.sources import first_eval_records

    return first_eval_records(spec.data, spec.training.seed, spec.training.generations)


def ray_run_name(spec: JobSpec, run_id: str) -> str:
    """The Ray Train run (directory under storage.path) of an MLflow run: resuming the MLflow run
    reuses it, and with it its checkpoints."""
    return f"{spec.name}-{run_id[:8]}"


# How long the driver waits, after training, for an MLflow server that went away.
MLFLOW_WAIT_S = 300.0


def sync_tracking(spec: JobSpec, handle, checkpoint_dir: str, timeout_s: float = MLFLOW_WAIT_S) -> None:
    """Wait (up to `timeout_s`) for a tracking server that went away during training, then send
    the metrics rank 0 could not (they travel in the checkpoint). Raises `SpecError` when the
    server stays unreachable."""
    from orchestrator.tracking import runs
    from orchestrator.tracking.metrics import MetricLogger
    from orchestrator.training.checkpoint import PENDING_METRICS_FILE

    logger = MetricLogger(handle.uri, handle.run_id, fail_fast=False)
    # A resumed run's checkpoint may be in remote storage (s3://...): read where it is.
    if checkpoint_dir:
        logger.extend(read_json(storage_location(checkpoint_dir, PENDING_METRICS_FILE)) or [])
    if not runs.wait_for_server(handle.uri, timeout_s) or logger.close(timeout_s):
        raise SpecError([Problem(
            path="tracking.uri", message=f"the MLflow server at {redact_uri(handle.uri)} did not answer for "
                                         f"{timeout_s:.0f} s after training ("
                                         f"{str(logger.last_error).replace(handle.uri, redact_uri(handle.uri))}); "
                                         f"the trained checkpoint is kept at "
                                         f"{checkpoint_dir}",
            fix=f"bring the server back and run `orchestrator resume {spec.name}` (training is not repeated)")])
