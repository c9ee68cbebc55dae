"""What one worker does with its batches: the data order (`micro_batches`, `eval_batches`), an
optimizer step, an evaluation, and its peak memory. torch is imported inside the functions."""

from __future__ import annotations

import math
import random
import time

from orchestrator.data.records import IGNORE_INDEX, Example
from orchestrator.data.tokenize import collate


# --- data order ------------------------------------------------------------------------------


def micro_batches(train: list[Example], micro: int, rank: int, world: int, seed: int, start: int = 0):
    """An endless stream of this rank's micro batches: each epoch is a fresh seeded shuffle,
    dealt round-robin across ranks (as `DistributedSampler` does). `start` skips that many
    batches, so a resumed run sees exactly the batches an uninterrupted one would."""
    per_epoch = len(range(rank, len(train), world)) // micro
    epoch, skip = divmod(start, per_epoch) if per_epoch else (0, 0)
    while True:
        order = list(range(len(train)))
        random.Random(seed + epoch).shuffle(order)
        mine = order[rank::world]
        for i in range(skip * micro, len(mine) - micro + 1, micro):
            yield [train[j] for j in mine[i:i + micro]]
        epoch, skip = epoch + 1, 0


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


def peak_memory_bytes(use_gpu: bool) -> int:
    """This process's peak memory: on a GPU the most CUDA memory torch allocated; on the CPU the
    peak resident set size of the worker process (Linux reports ru_maxrss in KiB)."""
    import resource

    import torch

    if use_gpu:
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
