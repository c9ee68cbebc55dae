"""Optimizer steps of a job: examples per step, total steps, warm-up steps (pure)."""

from __future__ import annotations

import math

from orchestrator.spec import JobSpec


def examples_per_step(spec: JobSpec, world_size: int) -> int:
    """Examples one optimizer step consumes: micro batch x accumulation x workers."""
    t = spec.training
    return t.micro_batch_size * t.grad_accum * world_size


def optimizer_steps(spec: JobSpec, num_train_examples: int, world_size: int) -> int:
    """Total optimizer steps: `max_steps`, or `epochs` worth of the training set (at least 1)."""
    if spec.training.max_steps is not None:
        return spec.training.max_steps
    per_epoch = num_train_examples / examples_per_step(spec, world_size)
    return max(1, math.ceil(per_epoch * (spec.training.epochs or 1.0)))


def warmup_steps(spec: JobSpec, total_steps: int) -> int:
    return int(round(spec.training.warmup_ratio * total_steps))
