"""The orchestrator's training step in one process, no Ray: its DeepSpeed engine (ZeRO-0, the job's
generated config, `train_step`; the model's own loss or the worker's, its output layer on the
trained positions only) under variants, against an HF-Trainer-like step (forward, backward,
torch `clip_grad_norm_`, fused AdamW, scheduler), on the `lora-fp32` job's model and batches.
Blocks of K steps alternate across the variants for R rounds; prints each round and the median
throughput of each variant relative to the HF-like step.

    python benchmarks/engine_step.py K R      # e.g. 5 8
"""
import os
import statistics
import sys
import time
from pathlib import Path
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29561", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
import torch
torch.set_num_threads(2)
import deepspeed
from orchestrator.spec import load_spec
from orchestrator.planning.deepspeed import deepspeed_config
from orchestrator.models.loading import load_base, resolve_base
from orchestrator.models.adapters import prepare_for_training
from orchestrator.data.tokenize import load_datasets, load_tokenizer, collate
from orchestrator.training.steps import StepFeed, TrainedPositionsLoss, micro_batches, train_step
from orchestrator.training.worker import skip_shared_memory_comm_op
import importlib.util
spec_ = importlib.util.spec_from_file_location("bench", REPO / "benchmarks" / "run.py")
bench = importlib.util.module_from_spec(spec_); spec_.loader.exec_module(bench)
K, R = int(sys.argv[1]), int(sys.argv[2])
spec = load_spec(bench.QUICKSTART, bench.STEADY_JOBS["lora-fp32"] + [f"training.max_steps={K*R}"])
skip_shared_memory_comm_op(deepspeed)
deepspeed.init_distributed("gloo")
base = resolve_base(spec.model)
tok = load_tokenizer(base)
data = load_datasets(spec.data, tok, spec.training.seed)
t = spec.training

def model():
    torch.manual_seed(0)
    m = load_base(spec, base); m.config.use_cache = False
    return prepare_for_training(spec, m, base)

def ds(fused, allreduce=True, rows=False):
    m = model(); cfg = deepspeed_config(spec, world_size=1, use_gpu=False, total_steps=K * R, trainable_params=sum(p.numel() for p in m.parameters() if p.requires_grad),
                                                            largest_param=max(p.numel() for p in m.parameters()),
                                                            hidden_size=m.config.hidden_size)
    cfg["optimizer"]["params"]["fused"] = fused
    eng, *_ = deepspeed.initialize(model=m, model_parameters=[p for p in m.parameters() if p.requires_grad], config=cfg)
    eng.enable_backward_allreduce = allreduce
    stream = micro_batches(lambda: iter(data.train), len(data.train), t.micro_batch_size, 0, 1, t.seed)
    feed, n = StepFeed(stream, t.grad_accum, data.pad_id, torch.device("cpu")), [0]
    loss_of = TrainedPositionsLoss(eng.module) if rows else None
    def step():
        n[0] += 1
        return train_step(eng, feed, n[0], K * R + 3 - n[0], torch.device("cpu"), 1, loss_of)["step_time_s"]
    return step

def hf_like():
    from transformers import get_cosine_schedule_with_warmup
    m = model(); params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay, fused=True)
    sch = get_cosine_schedule_with_warmup(opt, 1, K * R)
    stream = micro_batches(lambda: iter(data.train), len(data.train), t.micro_batch_size, 0, 1, t.seed)
    def step():
        s = time.perf_counter()
        m.train(); b = collate(next(stream), data.pad_id)
        loss = m(**b).loss; loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        opt.step(); sch.step(); opt.zero_grad(set_to_none=True); loss.item()
        return time.perf_counter() - s
    return step

variants = {"ds, AdamW not fused (before)": ds(False), "ds + fused AdamW": ds(True), "ds + fused, no world-1 all-reduce": ds(True, False),
            "ds + fused, no all-reduce, trained rows (the worker's)": ds(True, False, True),
            "HF-like (fused AdamW, torch clip)": hf_like()}
for f in variants.values(): f(); f()  # warm up
times = {k: [] for k in variants}
for r in range(R):
    names = list(variants) if r % 2 == 0 else list(variants)[::-1]
    for k in names:
        times[k].append(sum(variants[k]() for _ in range(K)) / K)
    print(r, {k: round(1000 * v[-1], 1) for k, v in times.items()}, os.getloadavg()[0], flush=True)
ref = times["HF-like (fused AdamW, torch clip)"]
for k, v in times.items():
    ratios = [b / a for a, b in zip(v, ref)]  # throughput relative to HF-like: t_ref / t_variant
    print(f"{k:56s} median step {1000*statistics.median(v):6.1f} ms  throughput vs HF-like {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}, n={len(ratios)})")
print("load", os.getloadavg())
