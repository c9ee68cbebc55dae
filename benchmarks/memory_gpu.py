"""Planned vs measured GPU memory: train Llama-shaped models (random weights) for a few steps.

    python benchmarks/memory_gpu.py --dry-run          # CPU only: the planned figures
    python benchmarks/memory_gpu.py                    # on a GPU: run every case, write docs/memory.md
    python benchmarks/memory_gpu.py --only 1b-qlora    # cases whose name starts with this

Each case runs in a fresh process, built the way the worker loop builds a job (`trainable_model`,
`deepspeed_config`, one GPU), and reports `torch.cuda.max_memory_allocated()`
over the training steps beside the plan's allocated bytes (its total less the CUDA context and
allocator slack, which that counter does not see). The models are Llama-3.2-1B and -3B shaped,
with random weights saved once to a scratch directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.planning.architectures import architecture_from_config  # noqa: E402
from orchestrator.planning.memory import memory_plan  # noqa: E402
from orchestrator.planning.units import GiB, human  # noqa: E402
from orchestrator.spec import JobSpec, parse_spec  # noqa: E402

DOC = REPO / "docs" / "memory.md"
START, END = "<!-- gpu-results:start -->", "<!-- gpu-results:end -->"
MODELS = {"1b": "meta-llama/Llama-3.2-1B", "3b": "meta-llama/Llama-3.2-3B", "8b": "meta-llama/Meta-Llama-3-8B"}


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # a key of MODELS
    method: str = "lora"
    bits: int | None = None
    stage: int = 0
    gc: bool = False
    micro: int = 4
    seq: int = 1024

    def spec(self, base: str) -> JobSpec:
        return parse_spec({
            "name": self.name, "model": {"base": base, "gradient_checkpointing": self.gc},
            "quantization": {"bits": self.bits}, "peft": {"method": self.method, "r": 16, "dropout": 0.05},
            "data": {"train": "unused.jsonl", "max_seq_len": self.seq},
            "training": {"max_steps": 10, "micro_batch_size": self.micro},
            "distributed": {"num_workers": 1, "deepspeed": {"stage": self.stage}}})


CASES = [
    Case("1b-lora-bf16-z0", "1b"),
    Case("1b-lora-bf16-z0-gc", "1b", gc=True),
    Case("1b-qlora-z0", "1b", bits=4),
    Case("1b-qlora-z2-gc", "1b", bits=4, stage=2, gc=True, micro=8),
    Case("1b-full-z0-gc", "1b", method="full", gc=True),
    Case("1b-full-z3-gc", "1b", method="full", stage=3, gc=True),
    Case("3b-qlora-z0-gc", "3b", bits=4, gc=True, micro=8, seq=2048),
    Case("3b-lora-bf16-z2", "3b", stage=2, micro=2),
    Case("3b-full-z2-gc", "3b", method="full", stage=2, gc=True, micro=2),
]


def planned(case: Case, gpu_bytes: int):
    from orchestrator.planning.catalogue import CATALOGUE

    arch = architecture_from_config(CATALOGUE[MODELS[case.model]], MODELS[case.model], source="catalogue")
    return memory_plan(case.spec(MODELS[case.model]), arch, world_size=1, gpu_memory_bytes=gpu_bytes,
                       gpu_memory_source="benchmark")


# --- on the GPU ---------------------------------------------------------------------------------


def build_model_dir(model: str, root: Path) -> Path:
    """Random-weight model of the catalogue's shape, saved once (bf16) for `from_pretrained`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from orchestrator.planning.catalogue import CATALOGUE

    path = root / model
    if (path / "config.json").is_file():
        return path
    config = dict(CATALOGUE[MODELS[model]])
    hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    m.save_pretrained(path)
    del m
    torch.cuda.empty_cache()
    return path


def run_case(case: Case, model_dir: Path, steps: int) -> dict:
    """Train `steps` steps of one case in this process; the measured bytes."""
    import socket

    import deepspeed
    import torch

    from orchestrator.models.adapters import trainable_model
    from orchestrator.planning.architectures import architecture_for
    from orchestrator.planning.deepspeed import deepspeed_config
    from orchestrator.planning.parameters import count_params

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend="nccl")
    spec = case.spec(str(model_dir))
    arch = architecture_for(spec)
    counts = count_params(arch, spec)
    config = deepspeed_config(spec, world_size=1, use_gpu=True, total_steps=steps + 1,
                              trainable_params=counts.trainable, largest_param=counts.largest,
                              hidden_size=arch.hidden_size)
    model = trainable_model(spec, str(model_dir), "cuda", config)  # as the worker builds it
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
    torch.cuda.synchronize()
    after_init = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    engine.train()
    g = torch.Generator(device="cuda").manual_seed(0)
    b, s = case.micro, case.seq
    start = time.perf_counter()
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (b, s), device="cuda", generator=g)
        mask = torch.ones_like(ids)
        mask[-1, s - s // 4:] = 0  # a padded row, as real batches have
        loss = engine(input_ids=ids, attention_mask=mask, labels=ids).loss
        engine.backward(loss)
        engine.step()
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return {"name": case.name, "after_init": after_init, "peak_allocated": torch.cuda.max_memory_allocated(),
            "peak_reserved": torch.cuda.max_memory_reserved(), "device_used": total - free,
            "device_total": total, "step_s": (time.perf_counter() - start) / steps,
            "gpu": torch.cuda.get_device_name(0)}


# --- driver ---------------------------------------------------------------------------------------


def table(rows: list[dict], measured: bool) -> str:
    head = "| case | planned allocated | planned total |"
    rule = "|---|---:|---:|"
    if measured:
        head += " measured peak allocated | planned / measured | peak reserved | device used |"
        rule += "---:|---:|---:|---:|"
    lines = [head, rule]
    for r in rows:
        line = f"| {r['name']} | {human(r['planned_allocated'])} | {human(r['planned_total'])} |"
        if measured:
            if "error" in r:
                line += f" {r['error']} | | | |"
            else:
                ratio = r["planned_allocated"] / r["peak_allocated"]
                line += (f" {human(r['peak_allocated'])} | {ratio:.2f} | {human(r['peak_reserved'])} |"
                         f" {human(r['device_used'])} |")
        lines.append(line)
    return "\n".join(lines)


def write_doc(rows: list[dict], gpu: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    body = (f"{START}\nMeasured on {gpu}, {time.strftime('%Y-%m-%d')}, by `python benchmarks/memory_gpu.py`:\n\n"
            f"{table(rows, measured=True)}\n{END}")
    before, _, rest = text.partition(START)
    _, _, after = rest.partition(END)
    DOC.write_text(before + body + after, encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="plan only (no GPU): print the planned figures")
    ap.add_argument("--only", default="", help="run the cases whose name starts with this")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--scratch", default=os.path.join(tempfile.gettempdir(), "memory-bench"),
                    help="where the random-weight models are saved")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = ap.parse_args()
    cases = [c for c in CASES if c.name.startswith(args.only)]

    if args.case:
        case = next(c for c in CASES if c.name == args.case)
        result = run_case(case, build_model_dir(case.model, Path(args.scratch)), args.steps)
        print("RESULT " + json.dumps(result), flush=True)
        return

    rows = []
    for case in cases:
        p = planned(case, 141 * GiB)
        rows.append({"name": case.name, "planned_allocated": p.allocated_bytes, "planned_total": p.total_bytes})
    if args.dry_run:
        print(table(rows, measured=False))
        return

    gpu = "?"
    for case, row in zip(cases, rows):
        proc = subprocess.run([sys.executable, __file__, "--case", case.name, "--steps", str(args.steps),
                               "--scratch", args.scratch], capture_output=True, text=True)
        found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if found:
            row.update(json.loads(found[-1][len("RESULT "):]))
            gpu = row["gpu"]
        else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            row["error"] = "OOM" if "OutOfMemory" in proc.stderr else f"failed: {tail[0][:80]}"
        print(json.dumps(row), flush=True)
    print(table(rows, measured=True))
    write_doc(rows, gpu)


if __name__ == "__main__":
    main()
