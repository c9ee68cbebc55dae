"""QLoRA throughput on one GPU: the orchestrator against a plain HF Trainer + PEFT script.

    python benchmarks/throughput_gpu.py --dry-run     # CPU: print the cases and the FLOPs per token
    python benchmarks/throughput_gpu.py               # on a GPU: both sides, every case -> docs/benchmarks.md
    python benchmarks/throughput_gpu.py --only 1b     # cases whose name starts with this

Models are Llama-3.2-1B and Llama-3-8B shaped, random weights (saved once, bf16, by
`memory_gpu.build_model_dir`), QLoRA (NF4, double quant, bf16 compute), LoRA r=16 on all linear
layers, sequence length 2048, gradient checkpointing, micro batch 1 x accumulation 8.

- orchestrator: `run_job` with one GPU worker (Ray Train + DeepSpeed ZeRO-0), tokens/s of its
  training loop (its `time_steps_s`, logging and reports included);
- plain: `transformers.Trainer` + PEFT in one process (`--side plain`), tokens/s over the same
  steps after the first (warm-up) one.

Model FLOPs utilisation uses the PaLM convention: 6 x parameters + 12 x layers x hidden x seq
FLOPs per token, against the GPU's dense bf16 peak (H200/H100 SXM: 989 TFLOP/s). Published
reference points: torchtune reports 8B QLoRA at 2,413 tokens/s on one RTX 4090 and 3B QLoRA at
8,035 tokens/s on one A100.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

DOC = REPO / "docs" / "benchmarks.md"
START, END = "<!-- gpu-results:start -->", "<!-- gpu-results:end -->"
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12}
MODELS = {"1b": "meta-llama/Llama-3.2-1B", "8b": "meta-llama/Meta-Llama-3-8B"}
SEQ, MICRO, ACCUM, STEPS, R = 2048, 1, 8, 12, 16


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # a key of MODELS


CASES = [Case("1b-qlora", "1b"), Case("8b-qlora", "8b")]


def flops_per_token(model: str) -> float:
    """6N + 12 L d s: the PaLM paper's training FLOPs per token (forward + backward)."""
    from orchestrator.planning.architectures import architecture_from_config
    from orchestrator.planning.catalogue import CATALOGUE
    from orchestrator.planning.parameters import count_params

    arch = architecture_from_config(CATALOGUE[MODELS[model]], MODELS[model], source="catalogue")
    return 6 * count_params(arch).total + 12 * arch.num_layers * arch.hidden_size * SEQ


def peak_flops(gpu_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu_name), None)


def write_data(root: Path, examples: int) -> Path:
    """Text records long enough to fill SEQ tokens each (the built-in tokenizer's words)."""
    import random

    rng = random.Random(0)
    words = "the owl fox river forest small brown has two legs lives says hoot in at a".split()
    path = root / "train.jsonl"
    with path.open("w") as fh:
        for _ in range(examples):
            fh.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(SEQ * 2))}) + "\n")
    return path


def job_overrides(model_dir: Path, data: Path, scratch: Path) -> dict:
    return {
        "name": "throughput", "model": {"base": str(model_dir), "dtype": "bfloat16", "gradient_checkpointing": True},
        "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True},
        "peft": {"method": "lora", "r": R, "alpha": 2 * R, "target_modules": "all-linear"},
        "data": {"train": str(data), "format": "text", "max_seq_len": SEQ},
        "training": {"max_steps": STEPS, "micro_batch_size": MICRO, "grad_accum": ACCUM, "eval_every": STEPS,
                     "learning_rate": 1e-4},
        "distributed": {"num_workers": 1, "use_gpu": True, "deepspeed": {"stage": 0}},
        "tracking": {"uri": f"sqlite:///{scratch}/mlflow.db"}, "storage": {"path": str(scratch / "runs")},
    }


def tokenizer_dir(model_dir: Path) -> None:
    """The random-weight model uses the built-in tokenizer (ids < 1001 of its 128k vocabulary:
    the compute is the same)."""
    from orchestrator.models.builtin import resolve_builtin

    builtin = Path(resolve_builtin("builtin:tiny-llama"))
    for f in builtin.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            (model_dir / f.name).write_bytes(f.read_bytes())


def side_orchestrator(model_dir: Path, data: Path, scratch: Path) -> dict:
    import torch

    from orchestrator.spec import parse_spec
    from orchestrator.training.recipe import run_job

    summary = run_job(parse_spec(job_overrides(model_dir, data, scratch))).to_json()
    t = summary["timings"]
    tokens = summary["metrics"]["tokens_trained"]
    return {"tokens_per_s": tokens / (t["steps"] + t.get("log", 0) + t.get("report", 0)),
            "peak_bytes": None, "gpu": torch.cuda.get_device_name(0), "timings": t}


def side_plain(model_dir: Path, data: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, Trainer, TrainerCallback,
                              TrainingArguments)

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    rows = [tok(t, truncation=True, max_length=SEQ) for t in texts]
    rows = [{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"], "labels": r["input_ids"]}
            for r in rows]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": 0},
                                                 quantization_config=BitsAndBytesConfig(
                                                     load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                     bnb_4bit_use_double_quant=True,
                                                     bnb_4bit_compute_dtype=torch.bfloat16))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=2 * R, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))

    class Clock(TrainerCallback):
        marks: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.marks.append(time.perf_counter())

    clock = Clock()
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=MICRO,
                             gradient_accumulation_steps=ACCUM, max_steps=STEPS, learning_rate=1e-4, bf16=True,
                             logging_steps=STEPS, save_strategy="no", report_to=[], gradient_checkpointing=True,
                             gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.cuda.reset_peak_memory_stats()
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[clock]).train()
    seconds = clock.marks[-1] - clock.marks[0]  # steps 2..N: the first one warms up
    tokens = (STEPS - 1) * MICRO * ACCUM * SEQ
    return {"tokens_per_s": tokens / seconds, "peak_bytes": torch.cuda.max_memory_allocated(),
            "gpu": torch.cuda.get_device_name(0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="no GPU: print the cases and FLOPs per token")
    ap.add_argument("--only", default="")
    ap.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "throughput-bench")
    ap.add_argument("--side", choices=["orchestrator", "plain"], help=argparse.SUPPRESS)  # internal
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cases = [c for c in CASES if c.name.startswith(args.only)]
    if args.dry_run:
        for c in cases:
            print(f"{c.name}: {MODELS[c.model]} shape, {flops_per_token(c.model) / 1e9:.1f} GFLOPs per token, "
                  f"seq {SEQ}, micro {MICRO} x accum {ACCUM}, {STEPS} steps per side")
        return
    if args.side:
        from memory_gpu import build_model_dir

        case = next(c for c in CASES if c.name == args.case)
        args.scratch.mkdir(parents=True, exist_ok=True)
        model_dir = build_model_dir(case.model, args.scratch)
        tokenizer_dir(model_dir)
        data = write_data(args.scratch, examples=STEPS * MICRO * ACCUM + 8)
        result = (side_orchestrator(model_dir, data, args.scratch / "orch") if args.side == "orchestrator"
                  else side_plain(model_dir, data))
        print("RESULT " + json.dumps(result), flush=True)
        return

    rows = []
    for case in cases:
        row = {"name": case.name}
        for side in ("plain", "orchestrator"):  # each in a fresh process: one GPU state per run
            done = subprocess.run([sys.executable, __file__, "--side", side, "--case", case.name,
                                   "--scratch", str(args.scratch)], capture_output=True, text=True)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            row[side] = json.loads(line[7:]) if line else {"error": done.stderr[-500:]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_doc(rows)


def write_doc(rows: list[dict]) -> None:
    lines = ["| case | side | tokens/s per GPU | peak allocated | MFU |", "|---|---|---:|---:|---:|"]
    for row in rows:
        for side in ("plain", "orchestrator"):
            r = row[side]
            if "error" in r:
                lines.append(f"| {row['name']} | {side} | failed: {r['error'][-120:]!r} | | |")
                continue
            peak = peak_flops(r["gpu"])
            mfu = f"{100 * r['tokens_per_s'] * flops_per_token(row['name'].split('-')[0]) / peak:.1f}%" if peak else "?"
            mem = f"{r['peak_bytes'] / 2**30:.1f} GiB" if r.get("peak_bytes") else "n/a"
            lines.append(f"| {row['name']} | {side} | {r['tokens_per_s']:.0f} | {mem} | {mfu} |")
    text = DOC.read_text()
    body = f"{START}\nMeasured {time.strftime('%Y-%m-%d')} by `python benchmarks/throughput_gpu.py`:\n\n" + \
        "\n".join(lines) + f"\n{END}"
    before, _, rest = text.partition(START)
    _, _, after = rest.partition(END)
    DOC.write_text(before + body + after)


if __name__ == "__main__":
    main()
