"""`orchestrator run`: spec -> plan -> launch -> train (workers) -> track -> register -> summary."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from orchestrator.spec import JobSpec, Problem, SpecError

StatusFn = Callable[[str], None]
ProgressFn = Callable[[str, int, int, dict], None]  # (task, done, total, metrics)


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
    trials: list[dict] | None = None  # a search: every trial, ranked (best first)

    def to_json(self) -> dict:
        out = {"run_id": self.run_id, "experiment": self.experiment, "metrics": self.metrics,
               "registered_model": self.registered_model}
        return out if self.trials is None else {**out, "trials": self.trials}


def file_sha256(path: str) -> str:
    import hashlib

    from orchestrator.base_model import hash_file

    digest = hashlib.sha256()
    hash_file(digest, path)
    return digest.hexdigest()


def lineage_of(spec: JobSpec, base_path: str) -> dict:
    """What a trained model came from, beyond the spec: the base and the sha256 of its weights
    (checked when an adapter is loaded) and the sha256 of each data file."""
    from orchestrator.base_model import base_sha256

    data = {f"{field}_sha256": file_sha256(path) for field in ("train", "eval")
            if isinstance(path := getattr(spec.data, field), str)}
    return {"base": spec.model.base, "base_revision": spec.model.revision,
            "base_sha256": base_sha256(spec.model, base_path), "data": data}


@dataclass
class Prepared:
    """What every run of a job needs before it trains: the base, its tokenizer, the tokenized
    data, the Ray resources of one run and the memory plan."""

    base_path: str
    tokenizer: object
    data: object
    gpus: float
    resources: object
    memory: object


def prepare(spec: JobSpec, *, address: str | None, verbose: bool, force: bool, gpu_memory_bytes: int | None,
            status: StatusFn, progress: ProgressFn | None) -> Prepared:
    """Resolve the base, tokenize the data, connect to Ray, and check that the job can start
    (enough data for one step on every worker, the memory plan on GPUs)."""
    from orchestrator import launch
    from orchestrator.base_model import load_tokenizer, resolve_base
    from orchestrator.data import load_datasets
    from orchestrator.memory_plan import human, plan_for_run
    from orchestrator.plan import examples_per_step, resources

    status(f"Resolving base model {spec.model.base}")
    base_path = resolve_base(spec.model, progress=(lambda i, n: progress("pre-training built-in base", i, n, {}))
                             if progress else None)
    tokenizer = load_tokenizer(base_path, spec.model.trust_remote_code)

    status("Tokenizing data")
    data = load_datasets(spec.data, tokenizer, spec.training.seed)

    status("Connecting to Ray" if address else "Starting Ray")
    gpus = launch.connect(address, verbose, dashboard=spec.tune is not None)
    res = resources(spec, gpus_available=gpus)
    needed = examples_per_step(spec, res.num_workers) // spec.training.grad_accum
    if len(data.train) < needed:
        raise SpecError([Problem(
            path="training.micro_batch_size",
            message=f"{len(data.train)} training examples cannot fill one micro batch on each of "
                    f"{res.num_workers} workers ({needed} needed)",
            fix="add data, or lower training.micro_batch_size or distributed.num_workers")])
    memory = plan_for_run(spec, res.num_workers, gpu_memory_bytes)
    if res.use_gpu:
        status(f"Memory plan: {human(memory.total_bytes)} of {human(memory.gpu_memory_bytes)} per GPU")
        if not memory.fits and not force:
            raise DoesNotFit(memory)
        if address is None and gpus < res.num_workers:
            # A local Ray instance never grows: Ray Train would wait for GPUs forever.
            raise SpecError([Problem(
                path="distributed.use_gpu",
                message=f"the job asks for {res.num_workers} GPU worker(s) but this machine has {gpus:g} GPU(s)",
                fix="set distributed.use_gpu=auto (or false), or lower distributed.num_workers")])
    return Prepared(base_path=base_path, tokenizer=tokenizer, data=data, gpus=gpus, resources=res, memory=memory)


def run_job(spec: JobSpec, *, address: str | None = None, verbose: bool = False, force: bool = False,
            gpu_memory_bytes: int | None = None, restart: bool = False,
            status: StatusFn = lambda _: None, progress: ProgressFn | None = None,
            on_trials: Callable[[list], None] | None = None) -> RunSummary:
    """Run a job end to end and return its summary. Raises `SpecError` for problems with the
    job found before any worker starts (data, model, sizes), and `DoesNotFit` when the memory
    plan says a GPU job cannot fit (unless `force`).

    A job with a `tune` section is a search (`search_job.run_search`): `restart` starts it
    afresh instead of resuming an unfinished one, `on_trials` sees the trials as they change."""
    from orchestrator import launch, tracking
    from orchestrator.plan import deepspeed_config, optimizer_steps
    from orchestrator.train_loop import WorkerJob

    if spec.tune is not None:
        from orchestrator.search_job import run_search

        return run_search(spec, address=address, verbose=verbose, force=force, gpu_memory_bytes=gpu_memory_bytes,
                          restart=restart, status=status, progress=progress, on_trials=on_trials)
    started = time.time()
    p = prepare(spec, address=address, verbose=verbose, force=force, gpu_memory_bytes=gpu_memory_bytes,
                status=status, progress=progress)
    base_path, tokenizer, data, res, memory = p.base_path, p.tokenizer, p.data, p.resources, p.memory
    total = optimizer_steps(spec, len(data.train), res.num_workers)
    ds_config = deepspeed_config(spec, world_size=res.num_workers, use_gpu=res.use_gpu, total_steps=total)

    lineage = lineage_of(spec, base_path)
    handle = tracking.start_run(
        spec, tags={"total_steps": str(total), "num_workers": str(res.num_workers),
                    "use_gpu": str(res.use_gpu), "zero_stage": str(spec.distributed.deepspeed.stage),
                    **tracking.lineage_tags(lineage)},
        artifacts={"deepspeed_config.json": ds_config, "data_stats.json": data.stats,
                   "memory_plan.json": memory.to_json()})
    tracking.log_metrics(handle, {"planned_gpu_bytes": memory.total_bytes}, step=0)
    status(f"MLflow run {handle.run_id} in experiment '{handle.experiment}'")
    try:
        job = WorkerJob(spec=spec.model_dump(mode="json"), deepspeed_config=ds_config, total_steps=total,
                        train=data.train, eval=data.eval, pad_id=tokenizer.pad_token_id, use_gpu=res.use_gpu,
                        tracking_uri=handle.uri, run_id=handle.run_id)
        status(f"Training {total} steps on {res.num_workers} worker(s), "
               f"ZeRO stage {spec.distributed.deepspeed.stage}")
        fit = launch.fit(job, name=f"{spec.name}-{handle.run_id[:8]}", resources=res,
                         storage_path=spec.storage.path, max_failures=spec.distributed.max_failures,
                         on_progress=(lambda step, m: progress("training", step, total, m)) if progress else None)
        what = "full model" if spec.peft.method == "full" else {
            "adapter": "adapter", "merged": "merged model", "both": "adapter and the merged model"}[spec.registry.mode]
        status(f"Registering the {what} as '{spec.registered_name}'")
        version = tracking.register_trained(handle, spec, fit.adapter_dir, lineage=lineage,
                                            tags={"spec_hash": spec.spec_hash(), "base_model": spec.model.base})
        wall = time.time() - started
        metrics = {"base_eval_loss": fit.metrics.get("base_eval_loss"), "eval_loss": fit.metrics.get("eval_loss"),
                   "train_loss": fit.metrics.get("train_loss"), "tokens_per_s": fit.metrics.get("tokens_per_s"),
                   "wall_s": round(wall, 1)}
        tracking.log_metrics(handle, {"wall_s": wall, "final_eval_loss": metrics["eval_loss"]}, step=total)
        tracking.set_tags(handle, {"registered_model": version.uri, "registered_version": version.version})
        tracking.finish_run(handle, "FINISHED")
    except BaseException:
        tracking.finish_run(handle, "FAILED")
        raise
    metrics = {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in metrics.items()}
    return RunSummary(run_id=handle.run_id, experiment=handle.experiment, tracking_uri=handle.uri,
                      metrics=metrics, data=data.stats,
                      registered_model={**asdict(version), "uri": version.uri})
