"""The baseline: the quickstart's QLoRA job as a plain single-process transformers + peft script.

    python benchmarks/plain_loop.py jobs/quickstart.yaml --threads 2 [--steps N] [--set k=v ...]

What a user would write by hand: load the 4-bit base, wrap it with LoRA, torch AdamW with the
same warm-up + cosine schedule and clipping, bf16 autocast, a loop of forward/backward/step, evaluation at the
same interval, the adapter saved at the end. No Ray, no DeepSpeed, no MLflow.

To train on identical batches it borrows two things from the orchestrator: the job's numbers
(read from the same job file) and its tokenized examples (`orchestrator.data`), dealt in the same
seeded order. One process plays all of the job's workers: `micro_batch_size x num_workers`
examples per micro batch, so each optimizer step sees the same number of examples.

Prints one JSON object: seconds per phase (`time_<phase>_s`), tokens trained, eval losses, and
each step's tokens/s.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.perf_counter()
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def batches(train, size: int, seed: int):
    """Endless seeded per-epoch shuffles, `size` examples at a time (the orchestrator's order
    for one worker)."""
    epoch = 0
    while True:
        order = list(range(len(train)))
        random.Random(seed + epoch).shuffle(order)
        for i in range(0, len(order) - size + 1, size):
            yield [train[j] for j in order[i:i + size]]
        epoch += 1


def pad(examples, pad_id: int) -> dict:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@torch.no_grad()
def evaluate(model, examples, size: int, pad_id: int, cap: int | None) -> float:
    model.eval()
    chunks = [examples[i:i + size] for i in range(0, len(examples), size)][:cap]
    loss_sum, count = 0.0, 0
    for chunk in chunks:
        batch = pad(chunk, pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss_sum += F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                                    ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
    model.train()
    return loss_sum / max(count, 1)


def load_model(spec):
    """The job's base as a user loads it (4-bit NF4 when the job quantizes), with LoRA on every
    linear layer: (tokenizer, model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from orchestrator.models.builtin import resolve_builtin

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[spec.model.dtype]
    base = resolve_builtin(spec.model.base) if spec.model.base.startswith("builtin:") else spec.model.base
    tokenizer = AutoTokenizer.from_pretrained(base)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype) if spec.quantization.bits == 4 else None
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, quantization_config=quant,
                                                 device_map={"": "cpu"})
    if quant is not None:
        # bitsandbytes 0.50's inference-only CPU kernel stops gradients (see models/loading.py):
        # any script training a 4-bit model on this CPU needs this line.
        import bitsandbytes as bnb

        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=spec.peft.r, lora_alpha=spec.peft.alpha, lora_dropout=spec.peft.dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    return tokenizer, model


def load_job(job, overrides: list[str]):
    """(spec, tokenizer, model, tokenized data) of a job file with `--set` overrides."""
    from orchestrator.data.tokenize import load_datasets
    from orchestrator.spec import load_spec

    spec = load_spec(job, overrides)
    tokenizer, model = load_model(spec)
    return spec, tokenizer, model, load_datasets(spec.data, tokenizer, spec.training.seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="override training.max_steps")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import get_cosine_schedule_with_warmup

    from orchestrator.data.tokenize import load_datasets
    from orchestrator.spec import load_spec

    times = {"import": time.perf_counter() - STARTED}
    spec = load_spec(args.job, args.overrides)
    t, workers = spec.training, spec.distributed.num_workers
    steps = args.steps or t.max_steps

    start = time.perf_counter()
    tokenizer, model = load_model(spec)
    times["load"] = time.perf_counter() - start

    start = time.perf_counter()
    data = load_datasets(spec.data, tokenizer, t.seed)
    times["data"] = time.perf_counter() - start

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, round(t.warmup_ratio * steps)), steps)
    stream = batches(data.train, t.micro_batch_size * workers, t.seed)
    pad_id = tokenizer.pad_token_id
    eval_size = t.micro_batch_size * 2
    cap = t.eval_batches * workers if t.eval_batches else None

    # bf16 compute over fp32 adapter weights, as HF Trainer's `bf16=True` does (DeepSpeed's bf16
    # mode keeps fp32 master weights likewise).
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    times["eval"] = 0.0
    start = time.perf_counter()
    with autocast:
        evals = {0: evaluate(model, data.eval, eval_size, pad_id, cap)}
    times["eval"] += time.perf_counter() - start
    times["steps"], tokens, losses, step_tokens_per_s = 0.0, 0, [], []
    model.train()
    for step in range(1, steps + 1):
        start, step_tokens = time.perf_counter(), 0
        for _ in range(t.grad_accum):
            batch = pad(next(stream), pad_id)
            with autocast:
                loss = model(**batch).loss
            (loss / t.grad_accum).backward()
            step_tokens += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        elapsed = time.perf_counter() - start
        times["steps"] += elapsed
        tokens += step_tokens
        step_tokens_per_s.append(step_tokens / elapsed)
        if step % t.eval_every == 0 or step == steps:
            start = time.perf_counter()
            with autocast:
                evals[step] = evaluate(model, data.eval, eval_size, pad_id, cap)
            times["eval"] += time.perf_counter() - start

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(out)
    times["checkpoint"] = time.perf_counter() - start
    times["total"] = time.perf_counter() - STARTED
    print(json.dumps({**{f"time_{k}_s": round(v, 3) for k, v in times.items()}, "tokens_trained": tokens,
                      "steps": steps, "tokens_per_s": tokens / times["steps"], "eval_loss": evals,
                      "step_tokens_per_s": [round(x, 1) for x in step_tokens_per_s],
                      "train_loss": losses[-1] if losses else math.nan}))


if __name__ == "__main__":
    main()
