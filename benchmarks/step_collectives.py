"""What the worker's per-step collectives cost: the quickstart's 2-rank QLoRA step (ZeRO-2, 1 thread
per rank, gloo), in one pair of processes, no Ray. Variants stepped in alternating blocks of K steps
for R rounds, each with its own engine (the same seed and batches):

- `feed 16`: `train_step` as the worker runs it, its `StepFeed` reading 16 steps ahead (one
  all-reduce of token counts and earlier losses per 16 steps), with the model's own loss as the
  other variants have it (the worker's output layer on the trained positions only is measured by
  `benchmarks/engine_step.py`): the variants differ in their collectives alone;
- `feed 1`: the same reading one step at a time (one all-reduce per step);
- `bare`: forward, `engine.backward`, `engine.step` and nothing else (no token weighting);
- `ddp`: HF Trainer's step without DeepSpeed: torch DDP, bf16 autocast, torch clipping, fused
  AdamW, its per-step all-reduce of the token count.

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/step_collectives.py K R   # e.g. 8 8

Rank 0 prints each variant's median step and its throughput relative to `feed 16` (median of the
rounds, with min and max).
"""
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

torch.set_num_threads(1)
import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

from orchestrator.data.tokenize import collate, load_datasets, load_tokenizer  # noqa: E402
from orchestrator.models.adapters import prepare_for_training  # noqa: E402
from orchestrator.models.loading import load_base, resolve_base  # noqa: E402
from orchestrator.planning.deepspeed import deepspeed_config  # noqa: E402
from orchestrator.spec import load_spec  # noqa: E402
from orchestrator.training.steps import StepFeed, micro_batches, train_step, trained_tokens  # noqa: E402
from orchestrator.training.worker import skip_shared_memory_comm_op  # noqa: E402

K, R = int(sys.argv[1]), int(sys.argv[2])
skip_shared_memory_comm_op(deepspeed)
deepspeed.init_distributed("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
total_steps = K * R + 10
spec = load_spec(REPO / "jobs" / "quickstart.yaml", [f"training.max_steps={total_steps}"])
t = spec.training
base = resolve_base(spec.model)
data = load_datasets(spec.data, load_tokenizer(base), t.seed)


def model():
    torch.manual_seed(0)
    m = load_base(spec, base)
    m.config.use_cache = False
    return prepare_for_training(spec, m, base)


def stream():
    return micro_batches(lambda: iter(data.train), len(data.train), t.micro_batch_size, rank, world, t.seed)


def engine():
    m = model()
    trainable = [p for p in m.parameters() if p.requires_grad]
    config = deepspeed_config(spec, world_size=world, use_gpu=False, total_steps=total_steps,
                              trainable_params=sum(p.numel() for p in trainable),
                              largest_param=max(p.numel() for p in m.parameters()), hidden_size=m.config.hidden_size)
    return deepspeed.initialize(model=m, model_parameters=trainable, config=config)[0]


def fed(ahead: int):
    eng, feed, step = engine(), StepFeed(stream(), t.grad_accum, data.pad_id, torch.device("cpu"), ahead), [0]

    def one():
        step[0] += 1
        return train_step(eng, feed, step[0], total_steps - step[0] + 1, torch.device("cpu"), world)["step_time_s"]
    return one


def bare():
    eng, batches = engine(), stream()

    def one():
        start = time.perf_counter()
        eng.train()
        loss = eng(**collate(next(batches), data.pad_id)).loss
        eng.backward(loss)
        eng.step()
        loss.item()
        return time.perf_counter() - start
    return one


def ddp():
    from transformers import get_cosine_schedule_with_warmup

    m = model()
    params = [p for p in m.parameters() if p.requires_grad]
    wrapped = torch.nn.parallel.DistributedDataParallel(m)
    opt = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay, fused=True)
    schedule = get_cosine_schedule_with_warmup(opt, 1, total_steps)
    batches = stream()

    def one():
        start = time.perf_counter()
        wrapped.train()
        batch = collate(next(batches), data.pad_id)
        count = torch.tensor([float(trained_tokens(batch["labels"]))])
        dist.all_reduce(count)  # HF Trainer's num_items_in_batch
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = wrapped(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        return time.perf_counter() - start
    return one


variants = {"feed 16": fed(16), "feed 1": fed(1), "bare": bare(), "ddp": ddp()}
for run in variants.values():  # warm up
    for _ in range(3):
        run()
times = {k: [] for k in variants}
for r in range(R):
    for k in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
        times[k].append(sum(variants[k]() for _ in range(K)) / K)
if rank == 0:
    ref = times["feed 16"]
    for k, v in times.items():
        ratios = [a / b for a, b in zip(ref, v)]  # throughput relative to feed 16: t_ref / t_variant
        print(f"{k:8s} median step {1000 * statistics.median(v):6.1f} ms  throughput vs feed 16 "
              f"{statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}, n={len(ratios)})")
    print("load", os.getloadavg())
