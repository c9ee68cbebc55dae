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
    # For `orchestrator compare`: the plan, the measured run, and the saved adapter's size.
    planned: dict = field(default_factory=dict)
    measured: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"run_id": self.run_id, "experiment": self.experiment, "metrics": self.metrics,
                "registered_model": self.registered_model}


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


def run_job(spec: JobSpec, *, address: str | None = None, verbose: bool = False, force: bool = False,
            gpu_memory_bytes: int | None = None, register: bool = True, parent_run_id: str | None = None,
            status: StatusFn = lambda _: None, progress: ProgressFn | None = None) -> RunSummary:
    """Run a job end to end and return its summary. Raises `SpecError` for problems with the
    job found before any worker starts (data, model, sizes), and `DoesNotFit` when the memory
    plan says a GPU job cannot fit (unless `force`). With `register=False` the trained weights
    stay in `storage.path` only; `parent_run_id` nests the MLflow run under that run."""
    from orchestrator import launch, tracking
    from orchestrator.base_model import load_tokenizer, resolve_base
    from orchestrator.data import load_datasets
    from orchestrator.memory_plan import human, plan_for_run
    from orchestrator.plan import deepspeed_config, examples_per_step, optimizer_steps, resources
    from orchestrator.train_loop import WorkerJob

    started = time.time()
    status(f"Resolving base model {spec.model.base}")
    base_path = resolve_base(spec.model, progress=(lambda i, n: progress("pre-training built-in base", i, n, {}))
                             if progress else None)
    tokenizer = load_tokenizer(base_path, spec.model.trust_remote_code)

    status("Tokenizing data")
    data = load_datasets(spec.data, tokenizer, spec.training.seed)

    status("Connecting to Ray" if address else "Starting Ray")
    gpus = launch.connect(address, verbose)
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
    total = optimizer_steps(spec, len(data.train), res.num_workers)
    ds_config = deepspeed_config(spec, world_size=res.num_workers, use_gpu=res.use_gpu, total_steps=total)

    lineage = lineage_of(spec, base_path)
    handle = tracking.start_run(
        spec, tags={"total_steps": str(total), "num_workers": str(res.num_workers),
                    "use_gpu": str(res.use_gpu), "zero_stage": str(spec.distributed.deepspeed.stage),
                    "peft_method": spec.peft.method, **tracking.lineage_tags(lineage),
                    **tracking.parent_tags(parent_run_id)},
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
        artifact_bytes = tracking.dir_size(fit.adapter_dir)
        version = None
        if register:
            what = {"full": "full model", "freeze": "changed weights"}.get(spec.peft.method, "adapter")
            what = {"adapter": what, "merged": "merged model", "both": f"{what} and the merged model"}[spec.registry.mode]
            status(f"Registering the {what} as '{spec.registered_name}'")
            version = tracking.register_trained(handle, spec, fit.adapter_dir, lineage=lineage,
                                                tags={"spec_hash": spec.spec_hash(), "base_model": spec.model.base})
        wall = time.time() - started
        metrics = {"base_eval_loss": fit.metrics.get("base_eval_loss"), "eval_loss": fit.metrics.get("eval_loss"),
                   "train_loss": fit.metrics.get("train_loss"), "tokens_per_s": fit.metrics.get("tokens_per_s"),
                   "wall_s": round(wall, 1)}
        measured = {"peak_memory_bytes": fit.metrics.get("peak_memory_bytes"),
                    "mean_tokens_per_s": fit.metrics.get("mean_tokens_per_s"), "artifact_bytes": artifact_bytes,
                    "artifact_dir": fit.adapter_dir}
        tracking.log_metrics(handle, {"wall_s": wall, "final_eval_loss": metrics["eval_loss"],
                                      "artifact_bytes": artifact_bytes}, step=total)
        if version:
            tracking.set_tags(handle, {"registered_model": version.uri, "registered_version": version.version})
        tracking.finish_run(handle, "FINISHED")
    except BaseException:
        tracking.finish_run(handle, "FAILED")
        raise
    metrics = {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in metrics.items()}
    return RunSummary(run_id=handle.run_id, experiment=handle.experiment, tracking_uri=handle.uri,
                      metrics=metrics, data=data.stats,
                      registered_model={**asdict(version), "uri": version.uri} if version else {},
                      planned={"total_params": memory.params.total, "trainable_params": memory.params.trainable,
                               "peak_bytes": memory.total_bytes, "world_size": res.num_workers},
                      measured=measured)
