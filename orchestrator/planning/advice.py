"""What would make a job fit: the changes worth trying, cheapest first, each judged by the plan it
would give (the caller's `plan_of`, so that this module needs no planner of its own)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from orchestrator.spec import BASE_TRAINING_METHODS, JobSpec


@dataclass(frozen=True)
class Recommendation:
    change: str
    sets: tuple[str, ...]  # the --set overrides that make the change
    total_bytes: int
    fits: bool
    world_size: int


def _candidates(spec: JobSpec, world_size: int):
    """(kind, description, spec changes, world size) of every change worth trying, cheapest
    first: what costs a little speed before what costs a lot, GPUs after that; a job that
    chose full fine-tuning hears about LoRA last, since that changes what it trains."""
    ds, t = spec.distributed.deepspeed, spec.training
    if spec.peft.method in BASE_TRAINING_METHODS:
        pass
    elif spec.quantization.bits is None:
        yield "quant", "4-bit NF4 base (QLoRA)", {"quantization.bits": 4}, world_size
    elif spec.quantization.bits == 8:
        yield "quant", "4-bit NF4 base instead of 8-bit", {"quantization.bits": 4}, world_size
    if not spec.model.gradient_checkpointing:
        yield "gc", "gradient checkpointing (~30% slower steps)", {"model.gradient_checkpointing": True}, world_size
    micro = t.micro_batch_size
    while micro > 1:
        micro //= 2
        accum = t.grad_accum * (t.micro_batch_size // micro)
        yield "batch", f"micro batch {micro} x {accum} accumulation steps (same effective batch)", {
            "training.micro_batch_size": micro, "training.grad_accum": accum}, world_size
    if ds.stage < 3 and world_size > 1:
        yield "zero3", "ZeRO-3: shard the weights too", {"distributed.deepspeed.stage": 3}, world_size
    if not ds.offload_optimizer:
        yield "offload", "offload the optimizer to host memory (slower steps)", {
            "distributed.deepspeed.stage": max(ds.stage, 2), "distributed.deepspeed.offload_optimizer": True,
        }, world_size
    if not ds.offload_params:
        yield "offload", "ZeRO-3 with parameter and optimizer offload (slowest)", {
            "distributed.deepspeed.stage": 3, "distributed.deepspeed.offload_optimizer": True,
            "distributed.deepspeed.offload_params": True}, world_size
    for n in (2, 4, 8, 16, 32, 64):
        if n > world_size:
            if ds.stage in (1, 2):
                yield "gpus", f"{n} GPUs", {"distributed.num_workers": n}, n
            yield "gpus", f"{n} GPUs with ZeRO-3", {"distributed.deepspeed.stage": 3, "distributed.num_workers": n}, n
    if spec.peft.method in BASE_TRAINING_METHODS:
        yield "peft", "LoRA instead of full fine-tuning", {"peft.method": "lora", "quantization.bits": None}, world_size
        yield "peft", "QLoRA: LoRA on a 4-bit NF4 base", {"peft.method": "lora", "quantization.bits": 4}, world_size


def _apply(spec: JobSpec, changes: dict) -> JobSpec:
    s = spec.model_copy(deep=True)
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = s
        for part in parents:
            node = getattr(node, part)
        setattr(node, leaf, value)
    return s


def _sets(changes: dict) -> tuple[str, ...]:
    def fmt(v):
        return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

    return tuple(f"{k}={fmt(v)}" for k, v in changes.items())


def recommendations(spec: JobSpec, plan_of: Callable[[JobSpec, int], object], *, world_size: int,
                    gpu_memory_bytes: int) -> list[Recommendation]:
    """The changes that make `spec` fit, cheapest first, each with its resulting per-GPU total
    (`plan_of(spec, world_size)`: the `MemoryPlan`, without advice, of a changed spec).

    First every single change that fits on its own; if none does, the cheapest changes applied
    one after another until the job fits (or nothing more helps).
    """
    single, kinds = [], set()
    for kind, what, changes, n in _candidates(spec, world_size):
        if kind in kinds:  # of the smaller micro batches or more GPUs, the first that fits is enough
            continue
        plan = plan_of(_apply(spec, changes), n)
        if plan.fits:
            kinds.add(kind)
            single.append(Recommendation(what, _sets(changes), plan.total_bytes, True, n))
    if single:
        return single[:5]

    # Nothing fits alone: add the cheapest changes that help, one of each kind, until it fits.
    chosen: dict[str, tuple[str, dict, int]] = {}
    best = plan_of(spec, world_size).total_bytes
    for kind, what, changes, n in _candidates(spec, world_size):
        trial = {**chosen, kind: (what, changes, n)}
        s, n_max = spec, world_size
        for _, c, m in trial.values():
            s, n_max = _apply(s, c), max(n_max, m)
        total = plan_of(s, n_max).total_bytes
        if total < best:
            chosen, best = trial, total
            if total <= gpu_memory_bytes:
                break
    if not chosen:
        return []
    merged: dict = {}
    for _, c, _ in chosen.values():
        merged.update(c)
    n_final = max([world_size] + [m for _, _, m in chosen.values()])
    return [Recommendation(" + ".join(w for w, _, _ in chosen.values()), _sets(merged), best,
                           best <= gpu_memory_bytes, n_final)]
