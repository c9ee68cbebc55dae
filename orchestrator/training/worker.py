"""The training loop that runs on every Ray Train worker.

Reads like a recipe: setup (or restore the latest checkpoint) -> evaluate the base -> steps (log)
-> eval -> checkpoint -> report. A checkpoint holds the full training state, so a worker group
restarted by Ray Train (`distributed.max_failures`) or a resumed run continues exactly.
It receives everything as plain data from the driver (`WorkerJob`); rank 0 logs per-step metrics
to MLflow and tells the driver's progress bar how far it is. `ray.train.report` is called only at
checkpoint steps, and at evaluations when a search needs them (each call is a barrier across
workers).
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.spec import JobSpec
from orchestrator.timing import Stopwatch
from orchestrator.training.checkpoint import (ADAPTER_DIR, PENDING_METRICS_FILE, TrainState, restore_state,
                                              save_state, save_trained)
from orchestrator.training.steps import (DEFAULT_EVAL_BATCHES, StepFeed, TrainedPositionsLoss, dataset_examples,
                                         eval_batches, evaluate_batches, micro_batches, packed_micro_batches,
                                         peak_memory_bytes, train_step)


@dataclass
class WorkerJob:
    """Everything a worker needs, prepared by the driver."""

    spec: dict
    deepspeed_config: dict
    total_steps: int
    # Where the tokenized rows are (a `TokenizedData`: their directory, local or shared storage,
    # and counts); each worker reads them from there, never from this object.
    data: Any
    train_examples: int | None  # None: not known yet (the data is tokenized while the run trains)
    eval_examples: int | None
    pad_id: int
    use_gpu: bool
    tracking_uri: str
    run_id: str
    progress: Any = None  # a Ray actor handle with `update(progress_key, step, metrics)`, or None
    progress_key: str = ""  # this run's updates in `progress` (it may serve several runs)
    # Report every evaluation to Ray Train (a search's scheduler needs them); otherwise only
    # checkpoints are reported: each report is a barrier across workers.
    report_evals: bool = False
    # How long rank 0 waits at the end for an unreachable MLflow before it leaves the unsent
    # metrics in the final checkpoint for the driver to send.
    final_flush_timeout_s: float = 120.0
    # The first `training.generations` eval records: rank 0 completes them at each evaluation.
    generation_records: list = field(default_factory=list)


# --- setup ---------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def skip_shared_memory_comm_op(deepspeed) -> None:
    """On the CPU, DeepSpeed's communication backend builds and loads a shared-memory all-reduce op
    in every worker (compiled just in time: about 30 s on a job's first run on a machine). Only its
    tensor-parallel inference layers use it; training reduces through the process group (gloo), so
    the op is marked unavailable, as DeepSpeed marks it on a platform that cannot build it."""
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def gather_in_place_on_gloo(deepspeed) -> bool:
    """Make DeepSpeed's all-gathers on a gloo process group (CPU workers) write straight into their
    output: one broadcast of each rank's slice. gloo's own all_gather_into_tensor stages the
    gathered tensor in one or two more whole copies (measured on 2 ranks: 32-48 MiB of peak for a
    16 MiB output), and ZeRO-3 all-gathers every weight it uses, so its peak held up to three
    copies of the largest. Returns whether the process group is gloo's (and the gather replaced)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_backend() != "gloo":
        return False
    deepspeed.init_distributed(dist_backend="gloo")  # wraps the existing process group
    deepspeed.comm.comm.cdb.all_gather_function = _all_gather_by_broadcasts
    return True


class _Collectives:
    """The handle of several asynchronous collectives, waited on as one."""

    def __init__(self, works: list):
        self.works = works

    def wait(self, *args, **kwargs) -> bool:
        for work in self.works:
            work.wait(*args, **kwargs)
        return True

    def is_completed(self) -> bool:
        return all(work.is_completed() for work in self.works)


def _all_gather_by_broadcasts(output_tensor, input_tensor, group=None, async_op=False):
    """torch.distributed.all_gather_into_tensor's result: the ranks' inputs side by side in
    `output_tensor`, each broadcast by its rank into its slice, with no buffer of gloo's own."""
    import torch.distributed as dist

    slices = output_tensor.view(-1).split(input_tensor.numel())
    mine = slices[dist.get_rank(group)]
    if mine.data_ptr() != input_tensor.data_ptr():  # ZeRO-3 passes the output's own slice
        mine.copy_(input_tensor.reshape(-1))
    handle = _Collectives([dist.broadcast(part, group=group, group_src=rank, async_op=True)
                           for rank, part in enumerate(slices)])
    if async_op:
        return handle
    handle.wait()
    return None


def release_stale_op_lock(name: str, older_than_s: float = 120.0) -> bool:
    """Remove a JIT-built op's lock file left by a killed process, so this worker does not wait on it
    forever: torch takes the op's build lock each time the op loads, even when it is built. When the
    op is built, the lock is held for well under a second; one older than `older_than_s` belongs to
    a dead process. Returns whether a lock was removed."""
    from torch.utils.cpp_extension import _get_build_directory

    folder = Path(_get_build_directory(name, verbose=False))
    lock = folder / "lock"
    built = any(folder.glob(f"{name}*.so"))
    try:
        if built and time.time() - lock.stat().st_mtime > older_than_s:
            lock.unlink()
            return True
    except FileNotFoundError:
        pass
    return False


def setup_engine(spec: JobSpec, job: WorkerJob, device):
    """Load the base (quantized as the spec says), add the adapter, wrap it in DeepSpeed."""
    import deepspeed

    from orchestrator.models.adapters import trainable_model
    from orchestrator.models.loading import resolve_base

    # Each worker resolves the base itself: a built-in model is built deterministically, so
    # every node of a cluster gets the same weights without shipping them. Under ZeRO-3 the
    # weights load already partitioned; under stages 0-2 straight onto `device`.
    base_path = resolve_base(spec.model)
    if not job.use_gpu:
        skip_shared_memory_comm_op(deepspeed)
        if spec.distributed.deepspeed.stage == 3:  # before the load: ZeRO-3 gathers while it builds the model
            gather_in_place_on_gloo(deepspeed)
    model = trainable_model(spec, base_path, str(device), job.deepspeed_config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not job.use_gpu:
        if job.deepspeed_config["zero_optimization"].get("offload_optimizer"):
            release_stale_op_lock("cpu_adam")  # DeepSpeedCPUAdam's op, built on first use
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable,
                                           config=job.deepspeed_config)
    if spec.distributed.deepspeed.stage == 0 and engine.world_size == 1:
        # One worker, ZeRO-0: nothing to average, yet after every backward DeepSpeed would flatten
        # each gradient, all-reduce the buffer with itself and copy it back (docs/benchmarks.md).
        engine.enable_backward_allreduce = False
    keep_fp32_grad_norm(engine)
    return engine


def keep_fp32_grad_norm(engine) -> None:
    """An fp32 engine without ZeRO clips its gradients with DeepSpeed's `clip_grad_norm_` and drops
    the norm it returns, so its `get_global_grad_norm()` stays None where every other engine (bf16,
    fp16, ZeRO 1-3) keeps the step's norm: keep it there too, and every run logs `grad_norm`."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_keep_the_norm():  # DeepSpeedEngine.clip_fp32_gradients, the norm kept
        engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                   max_norm=engine.gradient_clipping(), mpu=engine.mpu)

    engine.clip_fp32_gradients = clip_and_keep_the_norm


# How many tokens each logged generation gets: enough to see the answer take shape, cheap (about
# a second for 3 prompts on the demo model).
GENERATION_TOKENS = 24


def generation_logger(spec: JobSpec, job: WorkerJob, engine, rank: int, later):
    """Rank 0's `log(step)`: complete the fixed eval prompts with the model as it is now and
    append (step, prompt, reference, output) rows to the run's generations table; None where
    nothing is logged. Tables are sent through `later`, the metric logger's: on the training
    thread before the first step, on the logger's sender thread after it. Not under ZeRO-3:
    there each rank holds a slice of every weight, and generating on rank 0 alone would wait
    forever on the others' gathers. An unreachable MLflow costs the rows, never the run."""
    if rank != 0 or not job.generation_records or spec.distributed.deepspeed.stage == 3:
        return None
    import logging

    from orchestrator.data.formats import prompt_and_reference
    from orchestrator.models.inference import Loaded, complete_formatted
    from orchestrator.models.loading import load_tokenizer, resolve_base
    from orchestrator.tracking.evaluations import log_generations

    tokenizer = load_tokenizer(resolve_base(spec.model))
    prompts = [prompt_and_reference(r, spec.data.format, tokenizer) for r in job.generation_records]
    prompts = [p for p in prompts if p[2] is not None]  # text records have nothing to complete
    loaded = Loaded(model=engine.module, tokenizer=tokenizer, spec=spec)

    failed = []

    def log(step: int) -> None:
        if failed:
            return
        engine.eval()
        try:
            rows = [{"step": step, "prompt": prompt, "reference": reference,
                     "output": complete_formatted(loaded, text, GENERATION_TOKENS)}
                    for prompt, text, reference in prompts]
        except Exception as e:  # a method or kernel that cannot generate mid-training: the table is a side show
            failed.append(e)
            logging.getLogger(__name__).warning("no generations table: generating at step %d failed: %s", step, e)
            return

        def send() -> None:
            try:
                log_generations(job.tracking_uri, job.run_id, rows)
            except Exception as e:  # MLflow unreachable: training goes on
                logging.getLogger(__name__).warning("generations at step %d not logged: %s", step, e)

        later(send)

    return log if prompts else None


# --- the loop ----------------------------------------------------------------------------------


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import torch

    from orchestrator.tracking.metrics import MetricLogger

    job: WorkerJob = config["job"]
    started_at = time.time()
    watch = Stopwatch()  # where this worker's time goes; rank 0's figures reach the driver
    spec = JobSpec.model_validate(job.spec)
    t = spec.training
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if job.use_gpu else torch.device("cpu")
    torch.set_num_threads(spec.distributed.cpus_per_worker)
    seed_everything(t.seed)
    if job.data.failed():
        # Tokenizing beside training stopped with a problem, which the driver raises; a worker
        # group Ray Train restarted after that (`distributed.max_failures`) ends here, every rank
        # alike, instead of failing again, and again.
        return

    # Every rank streams all rows of the data set in the stored order and keeps its own: each
    # optimizer step consumes `grad_accum` micro batches per rank. The training pass starts
    # reading while the model loads (its first rows wait for step 1).
    train_pass = dataset_examples(functools.partial(job.data.row_batches, "train"), eval_rows=False, start_now=True)
    with watch("setup"):
        engine = setup_engine(spec, job, device)
        state = restore_state(engine, rank) or TrainState()
    # Rank 0 logs; steps the run already has (logged before a failure) are not logged again.
    logger = MetricLogger(job.tracking_uri, job.run_id) if rank == 0 else None
    progress = ProgressSender(job, rank)
    eval_pass = dataset_examples(functools.partial(job.data.row_batches, "eval"), eval_rows=True)
    if spec.data.packing:
        stream = packed_micro_batches(train_pass, t.micro_batch_size, rank, world, t.seed, spec.data.max_seq_len,
                                      start=state.step * t.grad_accum)
    else:
        stream = micro_batches(train_pass, job.train_examples, t.micro_batch_size, rank, world, t.seed,
                               start=state.step * t.grad_accum)

    log_generations = generation_logger(spec, job, engine, rank, logger.later if logger else None)

    # This rank's eval batches, read from its dataset at the first evaluation and kept: every
    # evaluation scores the same ones, at most `eval_batches` micro batches, so holding them costs
    # little and spares each later evaluation a pass over the files.
    # None: not read yet (one not counted yet, while the data is tokenized, is read to find out).
    eval_set: list | None = None
    # A job without eval examples (data.eval: null) is never evaluated: no eval_loss at all,
    # rather than NaN in MLflow, the progress bar and the summary.
    evaluates = job.eval_examples != 0
    loss_of = TrainedPositionsLoss(engine.module)  # training and evaluation: logits of the trained positions only

    def run_eval(step: int) -> dict:
        """{"eval_loss": ...} at `step`, or {} for a job without eval examples."""
        nonlocal eval_set
        if not evaluates:
            return {}
        with watch("eval"):
            if eval_set is None:
                eval_set = list(eval_batches(eval_pass(), t.micro_batch_size, rank, world,
                                              t.eval_batches or DEFAULT_EVAL_BATCHES))
            loss = evaluate_batches(engine, eval_set, job.pad_id, device, loss_of)
            if log_generations:
                log_generations(step)
            return {"eval_loss": loss}

    if state.step == 0:  # a fresh start (a checkpoint is never saved at step 0)
        base = run_eval(0)
        state.base_eval_loss = base.get("eval_loss")
        if logger:
            # The worker's niceness beside it: Ray starts its workers at 15, and a training
            # worker at 15 yields the CPU to everything else on the node (launch.TRAINING_WORKER_ENV).
            logger.log(0, {**base, "base_eval_loss": state.base_eval_loss, "worker_niceness": float(os.nice(0))})
        progress(0, base)
    elif logger:
        logger.log(state.step, {"resumed_from_step": state.step})
    if state.step >= job.total_steps:  # stopped after its last checkpoint: report that state again
        report(engine, spec, rank, state, run_eval(state.step), save=True,
               pending=logger.close(job.final_flush_timeout_s) if logger else [], total_steps=job.total_steps,
               run_id=job.run_id)
        return

    feed = StepFeed(stream, t.grad_accum, job.pad_id, device)
    with watch("setup"):  # the first steps' batches, read before the loop as HF Trainer's first is
        feed.read(job.total_steps - state.step)
    if logger:
        # The first send on this thread, before training: it imports MLflow's store, most of a
        # CPU-second that would slow the first steps beside it (docs/benchmarks.md). From here on
        # sends leave the training thread.
        logger.send()
        logger.start_background()
    tokens, latest = 0.0, {}  # latest: the last step whose loss and gradient norm are known
    for step in range(state.step + 1, job.total_steps + 1):
        last = step == job.total_steps
        evaluated = step % t.eval_every == 0 or last
        save = last or bool(t.checkpoint_every and step % t.checkpoint_every == 0)
        with watch("steps"):
            metrics = train_step(engine, feed, step, job.total_steps - step + 1, device, world, loss_of)
            if evaluated or save:  # a step that is reported or checkpointed carries its own loss
                feed.settle()
        tokens += metrics["tokens_per_s"] * metrics["step_time_s"]
        # Losses and gradient norms arrive with the feed's next read: each is logged at its own
        # step; the progress bar shows the latest ones known.
        known = feed.step_metrics()
        if known:
            latest = known[max(known)]
        metrics.update(known.pop(step, {}))
        if evaluated:
            metrics.update(run_eval(step))
        if last:  # rank 0's peak memory, for `orchestrator compare`
            metrics["peak_memory_bytes"] = float(peak_memory_bytes(job.use_gpu))
        with watch("log"):
            if logger:
                for earlier in sorted(known):
                    logger.log(earlier, known[earlier])
                logger.log(step, metrics)
                # An unreachable MLflow never stops training: what is not sent stays buffered,
                # and at the end whatever is still unsent travels in the final checkpoint.
                if save and not last:
                    # Before the checkpoint is reported: a run resumed from it logs only the
                    # steps after it, so the steps up to it must be in MLflow already.
                    logger.flush()
                elif "eval_loss" in metrics and not last:
                    logger.send()  # the MLflow UI shows each evaluation as it happens
            progress(step, {**metrics, **latest})
        if save or (job.report_evals and "eval_loss" in metrics):
            pending = logger.close(job.final_flush_timeout_s) if logger and last else []
            state.step = step
            if last:  # the run's totals travel with its final report (the last save is not in them)
                metrics = {**metrics, **watch.metrics(), "tokens_trained": tokens, "worker_started_at": started_at,
                           "worker_loop_s": time.time() - started_at}
            with watch("checkpoint" if save else "report"):
                report(engine, spec, rank, state, metrics, save, pending, total_steps=job.total_steps,
                       run_id=job.run_id)


def report(engine, spec: JobSpec, rank: int, state: TrainState, metrics: dict, save: bool,
           pending: list | None = None, *, total_steps: int, run_id: str) -> None:
    """Report to Ray Train (a barrier across workers), with a full-state checkpoint when `save`:
    every rank adds its files to the same checkpoint, which Ray persists to `storage.path`; the
    `adapter/` of the last one is what gets registered. Each report says the run's total steps,
    so a search's scheduler can tell a trial's last evaluation from the others."""
    import shutil

    import ray.train

    metrics = {"step": state.step, "total_steps": total_steps, "base_eval_loss": state.base_eval_loss, **metrics}
    if not save:
        ray.train.report(metrics)
        return
    tmp = checkpoint_staging(run_id, rank)
    shutil.rmtree(tmp, ignore_errors=True)  # what an attempt killed mid-save left (the run resumed)
    tmp.mkdir(parents=True)
    try:
        save_trained(engine, str(tmp / ADAPTER_DIR), rank, spec.distributed.deepspeed.stage, spec.peft.method)
        save_state(engine, str(tmp), rank, state)
        if rank == 0 and pending:
            (tmp / PENDING_METRICS_FILE).write_text(json.dumps(pending), encoding="utf-8")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_staging(run_id: str, rank: int) -> Path:
    """Where rank `rank` writes a checkpoint of run `run_id` before Ray Train persists it: a
    directory of its own in the temporary directory, removed once the checkpoint is reported. A
    worker killed while saving (its node lost, the driver stopped) cannot remove it; named for the
    run and rank, it is removed by the next checkpoint of the resumed run on that node."""
    return Path(tempfile.gettempdir(), f"orchestrator-checkpoint-{run_id}-rank{rank}")


class ProgressSender:
    """Rank 0 tells the driver's progress bar how far it is (fire and forget: never waits on the
    driver). Each update is an actor call made from the training thread, so at most one goes
    out every `interval_s` seconds (the driver's bar refreshes twice a second), plus every
    evaluation and the last step."""

    def __init__(self, job: WorkerJob, rank: int, interval_s: float = 0.5):
        self.actor = job.progress if rank == 0 else None
        self.key = job.progress_key
        self.interval_s, self.total = interval_s, job.total_steps
        self._sent_at = -math.inf

    def __call__(self, step: int, metrics: dict) -> bool:
        """Send unless one went out less than `interval_s` ago; returns whether it sent."""
        now = time.monotonic()
        must = "eval_loss" in metrics or step >= self.total
        if self.actor is None or (not must and now - self._sent_at < self.interval_s):
            return False
        self._sent_at = now
        self.actor.update.remote(self.key, step, metrics)
        return True
