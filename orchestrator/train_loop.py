"""The training loop that runs on every Ray Train worker.

Reads like a recipe: setup -> evaluate the base -> steps (log) -> eval -> checkpoint -> report.
It receives everything as plain data from the driver (`WorkerJob`); rank 0 logs per-step metrics
to MLflow and tells the driver's progress bar how far it is. `ray.train.report` is called only at
evaluation and checkpoint steps (each call is a barrier across workers and costs about a second).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from orchestrator.data import IGNORE_INDEX, Example, collate
from orchestrator.spec import JobSpec

ADAPTER_DIR = "adapter"


@dataclass
class WorkerJob:
    """Everything a worker needs, prepared by the driver."""

    spec: dict
    deepspeed_config: dict
    total_steps: int
    train: list[Example]
    eval: list[Example]
    pad_id: int
    use_gpu: bool
    tracking_uri: str
    run_id: str
    progress: Any = None  # a Ray actor handle with `update(step, metrics)`, or None


# --- setup ---------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_engine(spec: JobSpec, job: WorkerJob, device):
    """Load the base (quantized as the spec says), add the adapter, wrap it in DeepSpeed."""
    import deepspeed

    from orchestrator.base_model import load_base, prepare_for_training, resolve_base

    # Each worker resolves the base itself: a built-in model is built deterministically, so
    # every node of a cluster gets the same weights without shipping them.
    base_path = resolve_base(spec.model)
    model = load_base(spec, base_path, device=str(device))
    model.config.use_cache = False
    model = prepare_for_training(spec, model, base_path)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable,
                                           config=job.deepspeed_config)
    return engine


# --- data order ------------------------------------------------------------------------------


def micro_batches(train: list[Example], micro: int, rank: int, world: int, seed: int):
    """An endless stream of this rank's micro batches: each epoch is a fresh seeded shuffle,
    dealt round-robin across ranks (as `DistributedSampler` does)."""
    epoch = 0
    while True:
        order = list(range(len(train)))
        random.Random(seed + epoch).shuffle(order)
        mine = order[rank::world]
        for i in range(0, len(mine) - micro + 1, micro):
            yield [train[j] for j in mine[i:i + micro]]
        epoch += 1


def eval_batches(examples: list[Example], size: int, rank: int, world: int, cap: int | None):
    """This rank's eval batches with a weight each. Every rank gets the same number of batches
    (ZeRO-3's forward is collective), padding with weight-0 repeats where it has fewer."""
    batches = [examples[i:i + size] for i in range(0, len(examples), size)]
    if cap:
        batches = batches[:cap * world]
    per_rank = math.ceil(len(batches) / world)
    mine = batches[rank::world]
    return [(b, 1.0) for b in mine] + [(batches[0], 0.0)] * (per_rank - len(mine))


# --- steps -----------------------------------------------------------------------------------


def all_reduce_sum(values: list[float], device) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def train_step(engine, stream, grad_accum: int, pad_id: int, device) -> dict:
    """One optimizer step over `grad_accum` micro batches; metrics summed over all ranks."""
    start = time.perf_counter()
    loss_sum, tokens = 0.0, 0
    engine.train()
    for _ in range(grad_accum):
        batch = {k: v.to(device) for k, v in collate(next(stream), pad_id).items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        loss_sum += loss.item()
        tokens += int(batch["attention_mask"].sum())
    loss_total, tokens_total, n = all_reduce_sum([loss_sum / grad_accum, tokens, 1.0], device)
    elapsed = time.perf_counter() - start
    return {"train_loss": loss_total / n, "learning_rate": engine.get_lr()[0],
            "tokens_per_s": tokens_total / elapsed, "step_time_s": elapsed}


def evaluate(engine, examples: list[Example], size: int, pad_id: int, rank: int, world: int,
             device, cap: int | None = None) -> float:
    """Mean loss per trained token over the whole eval set (all ranks together)."""
    import torch
    import torch.nn.functional as F

    if not examples:
        return float("nan")
    engine.eval()
    loss_sum, count = 0.0, 0.0
    with torch.no_grad():
        for batch_examples, weight in eval_batches(examples, size, rank, world, cap):
            batch = {k: v.to(device) for k, v in collate(batch_examples, pad_id).items()}
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            # Prompt tuning prepends its virtual tokens' logits; score the real tokens only.
            logits = logits[:, -batch["input_ids"].size(1):]
            labels = batch["labels"][:, 1:]
            losses = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                                     labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
            loss_sum += weight * losses.item()
            count += weight * int((labels != IGNORE_INDEX).sum())
    total, n = all_reduce_sum([loss_sum, count], device)
    return total / max(n, 1.0)


def save_trained(engine, out_dir: str, rank: int, zero_stage: int, method: str) -> None:
    """Write what was trained from rank 0: the adapter (weights + config), for `freeze` the
    trained tensors alone, or for `full` the whole model. Under ZeRO-3 the partitioned weights
    are gathered first (a collective).

    For an adapter only the trainable tensors are read: asking the whole model for its state
    dict would also serialize the frozen 4-bit base, which is neither needed nor possible while
    ZeRO-3 holds it.
    """
    import deepspeed

    model = engine.module
    if method == "full":
        state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else model.state_dict()
        if rank == 0:
            model.save_pretrained(out_dir, state_dict=state)
        return
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    gather = (deepspeed.zero.GatheredParameters(list(trainable.values()), modifier_rank=None)
              if zero_stage == 3 else contextlib.nullcontext())
    with gather:  # collective under ZeRO-3: every rank enters
        if rank == 0:
            state = {n: p.detach().cpu().clone() for n, p in trainable.items()}
            if method == "freeze":
                from safetensors.torch import save_file

                from orchestrator.base_model import TRAINED_TENSORS

                os.makedirs(out_dir, exist_ok=True)
                save_file(state, os.path.join(out_dir, TRAINED_TENSORS), metadata={"format": "pt"})
            else:
                model.save_pretrained(out_dir, state_dict=state)


def peak_memory_bytes(use_gpu: bool) -> int:
    """This process's peak memory: on a GPU the most CUDA memory torch allocated; on the CPU the
    peak resident set size of the worker process (Linux reports ru_maxrss in KiB)."""
    import resource

    import torch

    if use_gpu:
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- the loop ----------------------------------------------------------------------------------


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import torch

    from orchestrator.tracking import MetricLogger

    job: WorkerJob = config["job"]
    spec = JobSpec.model_validate(job.spec)
    t = spec.training
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if job.use_gpu else torch.device("cpu")
    torch.set_num_threads(spec.distributed.cpus_per_worker)
    seed_everything(t.seed)

    engine = setup_engine(spec, job, device)
    logger = MetricLogger(job.tracking_uri, job.run_id) if rank == 0 else None
    stream = micro_batches(job.train, t.micro_batch_size, rank, world, t.seed)
    eval_size = t.micro_batch_size * 2

    def run_eval() -> float:
        return evaluate(engine, job.eval, eval_size, job.pad_id, rank, world, device, t.eval_batches)

    base_eval = run_eval()
    if logger:
        logger.log(0, {"eval_loss": base_eval, "base_eval_loss": base_eval})
        logger.flush()
    _progress(job, rank, 0, {"eval_loss": base_eval})

    metrics: dict = {}
    tokens = seconds = 0.0
    for step in range(1, job.total_steps + 1):
        metrics = train_step(engine, stream, t.grad_accum, job.pad_id, device)
        tokens, seconds = tokens + metrics["tokens_per_s"] * metrics["step_time_s"], seconds + metrics["step_time_s"]
        last = step == job.total_steps
        if step % t.eval_every == 0 or last:
            metrics["eval_loss"] = run_eval()
        if last:  # the whole run's throughput and rank 0's peak memory, for `orchestrator compare`
            metrics["mean_tokens_per_s"] = tokens / seconds
            metrics["peak_memory_bytes"] = float(peak_memory_bytes(job.use_gpu))
        if logger:
            logger.log(step, metrics)
        _progress(job, rank, step, metrics)
        save = last or bool(t.checkpoint_every and step % t.checkpoint_every == 0)
        if save or "eval_loss" in metrics:
            if logger:
                logger.flush()
            report(engine, spec, rank, {"step": step, "base_eval_loss": base_eval, **metrics}, save)


def report(engine, spec: JobSpec, rank: int, metrics: dict, save: bool) -> None:
    """Report to Ray Train (a barrier across workers), with the trained weights when `save`:
    Ray persists the checkpoint to `storage.path`; the last one is what gets registered."""
    import ray.train

    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_trained(engine, os.path.join(tmp, ADAPTER_DIR), rank, spec.distributed.deepspeed.stage,
                     spec.peft.method)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)


def _progress(job: WorkerJob, rank: int, step: int, metrics: dict) -> None:
    if rank == 0 and job.progress is not None:
        job.progress.update.remote(step, metrics)  # fire and forget: never waits on the driver
