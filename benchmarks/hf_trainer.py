"""The peers' baseline: a job trained by `transformers.Trainer` + peft, as LLaMA-Factory and most
fine-tuning scripts do it.

    python benchmarks/hf_trainer.py jobs/quickstart.yaml --threads 2 [--set k=v ...]
    python -m torch.distributed.run --nproc_per_node 2 benchmarks/hf_trainer.py JOB --threads 1   # DDP

The same model (loaded and wrapped as benchmarks/plain_loop.py does), the same tokenized examples
(`orchestrator.data`) padded by the orchestrator's `collate`, the job's micro batch per process,
accumulation, optimizer settings, schedule, clipping and precision (`bf16=True` for a bf16 job:
autocast over fp32 adapter weights); no evaluation or saving while it trains. Under
`torch.distributed.run` each process is one worker (DDP over gloo), as the job's `num_workers`.

Prints one JSON object (rank 0): tokens trained (real tokens: the attention mask's sum, all
ranks), the training loop's seconds (the first step's start to the last step's end, as the
orchestrator's `timings.steps` counts its loop) and each step's tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import Trainer, TrainerCallback, TrainingArguments

    from orchestrator.data.tokenize import collate
    from plain_loop import load_job

    spec, tokenizer, model, data = load_job(args.job, args.overrides)
    t = spec.training
    pad_id = tokenizer.pad_token_id
    tokens: list[int] = []  # real tokens of each micro batch, in the order the loop takes them

    def collator(examples):
        batch = collate(examples, pad_id)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not ends:  # the loop's start: the first step's (its batch is fetched just before)
                ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, max_steps=t.max_steps, per_device_train_batch_size=t.micro_batch_size,
            gradient_accumulation_steps=t.grad_accum, learning_rate=t.learning_rate, weight_decay=t.weight_decay,
            lr_scheduler_type=t.lr_scheduler, warmup_steps=max(1, round(t.warmup_ratio * t.max_steps)),
            max_grad_norm=t.max_grad_norm, bf16=spec.model.dtype == "bfloat16", use_cpu=True, seed=t.seed,
            # A loss logged every 10 steps (LLaMA-Factory's examples), nowhere but the log history.
            logging_steps=10, report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True,
            dataloader_num_workers=0, remove_unused_columns=False,
            ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None)
        trainer = Trainer(model=model, args=targs, train_dataset=data.train, data_collator=collator,
                          callbacks=[StepClock()])
        torch.set_num_threads(args.threads)  # accelerate may have set it from the environment
        trainer.train()

    # Step i (1-based) trained micro batches (i-1)*accum .. i*accum-1 (the loader may fetch one ahead).
    steps = len(ends) - 1
    per_step = [sum(tokens[i * t.grad_accum:(i + 1) * t.grad_accum]) for i in range(steps)]
    if torch.distributed.is_initialized():  # every rank's tokens, step by step
        summed = torch.tensor(per_step, dtype=torch.float64)
        torch.distributed.all_reduce(summed)
        per_step = [int(x) for x in summed.tolist()]
    seconds = [b - a for a, b in zip(ends, ends[1:])]
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"steps": steps, "tokens_trained": sum(per_step), "time_steps_s": round(sum(seconds), 3),
                          "tokens_per_s": sum(per_step) / sum(seconds), "threads": args.threads,
                          "world_size": int(os.environ.get("WORLD_SIZE", "1")),
                          "step_tokens_per_s": [round(n / s, 1) for n, s in zip(per_step, seconds)],
                          "train_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h),
                                             None)}))


if __name__ == "__main__":
    main()
