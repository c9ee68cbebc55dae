"""`orchestrator plan`: the GPU and host memory of a job, before any GPU is spent
(orchestrator/planning/memory.py), and what would make it fit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.cli.common import JobArg, SetOption, _fail, _gpu_memory, _load, app
from orchestrator.spec import JobSpec, SpecError


@app.command()
def plan(job: Path = JobArg, set_: Optional[List[str]] = SetOption,
         gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Memory of one GPU, e.g. 80GiB or 40GB "
                                                                            "(default: the local GPU, else 80 GiB)."),
         num_gpus: Optional[int] = typer.Option(None, "--num-gpus", min=1,
                                                help="GPUs to shard over (default: distributed.num_workers)."),
         as_json: bool = typer.Option(False, "--json", help="Print the plan as one JSON object on stdout."),
         explain: bool = typer.Option(False, "--explain", help="Show where each byte goes, beside the rule of thumb.")):
    """Plan the GPU and host memory of a job without a GPU; exit 0 if it fits, 1 if it does not."""
    from orchestrator.planning.architectures import architecture_for
    from orchestrator.planning.budget import gpu_budget
    from orchestrator.planning.memory import memory_plan

    spec = _load(job, set_)
    budget = _gpu_memory(gpu_memory)
    budget, source = gpu_budget(budget)
    try:  # the plan also resolves peft.target_modules against the architecture
        result = memory_plan(spec, architecture_for(spec), world_size=num_gpus or spec.distributed.num_workers,
                             gpu_memory_bytes=budget, gpu_memory_source=source)
    except SpecError as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
    else:
        _print_plan(spec, result, explain)
    raise typer.Exit(code=0 if result.fits else 1)


def _print_plan(spec: JobSpec, p, explain: bool) -> None:
    from orchestrator.planning.units import count, human

    out = Console()
    ds = spec.distributed.deepspeed
    n, t = p.params.total, p.params.trainable
    pm = spec.peft
    method = {"full": "full fine-tuning", "freeze": "freeze (selected weights)",
              "lora": f"{'Q' if spec.quantization.bits else ''}{'DoRA' if pm.use_dora else 'LoRA'} r={pm.r}"
              }.get(pm.method, pm.method) + (f", {spec.quantization.bits}-bit base" if spec.quantization.bits else "")
    out.print(f"[bold]{p.architecture.name}[/]: {count(n)} parameters, {count(t)} trainable ({100 * t / n:.2f}%), "
              f"{method}; {p.world_size} GPU(s), ZeRO-{ds.stage}"
              + (", optimizer offload" if ds.offload_optimizer else "")
              + (", parameter offload" if ds.offload_params else ""), highlight=False)
    def lines_table(where: str, title: str, bytes_header: str) -> Table:
        table = Table(title=title, title_justify="left")
        table.add_column("")
        table.add_column(bytes_header, justify="right")
        table.add_column("what")
        for line in p.lines:
            if line.where == where:
                table.add_row(line.category, human(line.bytes), line.what)
        return table

    table = lines_table("gpu", "Per GPU", "bytes")
    table.add_row("[bold]total", f"[bold]{human(p.total_bytes)}",
                  f"of {human(p.gpu_memory_bytes)} ({p.gpu_memory_source})")
    out.print(table)
    if p.cpu_per_gpu_bytes:
        host = lines_table("cpu", f"Host memory per node ({p.gpus_per_node} GPU(s) per node)", "bytes per GPU")
        host.add_row("[bold]per node", f"[bold]{human(p.cpu_per_node_bytes)}", "")
        out.print(host)
    if explain:
        _print_explain(p, spec)
    if p.fits:
        out.print(f"[bold green]fits[/]: {human(p.total_bytes)} of {human(p.gpu_memory_bytes)} per GPU, "
                  f"{human(p.gpu_memory_bytes - p.total_bytes)} to spare", highlight=False)
    else:
        out.print(f"[bold red]does not fit[/]: {human(p.total_bytes)} needed, {human(p.gpu_memory_bytes)} per GPU",
                  highlight=False)
    if p.recommendations:
        rec = Table(title="What would make it fit (cheapest first)", title_justify="left")
        rec.add_column("change")
        rec.add_column("per GPU", justify="right")
        rec.add_column("--set", overflow="fold")
        for r in p.recommendations:
            rec.add_row(r.change, human(r.total_bytes) + ("" if r.fits else " (still too big)"), " ".join(r.sets))
        out.print(rec)
    for a in p.assumptions:
        out.print(f"[dim]assumes: {a}[/]", highlight=False)


def _print_explain(p, spec: JobSpec) -> None:
    from orchestrator.planning.units import count, human

    out = Console()
    n = p.params.total
    table = Table(title="Where the bytes go, per parameter of the model", title_justify="left")
    table.add_column("")
    table.add_column("rule of thumb (full fine-tuning, Adam)")
    table.add_column("this job, per GPU", justify="right")
    table.add_column("B/param", justify="right")
    rows = [("weights", "4 B fp32 (2 B in bf16)", p.gpu("weights") + p.gpu("trainable")),
            ("gradients", "4 B fp32 (2 B bf16 + 4 B fp32 in mixed precision)", p.gpu("gradients")),
            ("optimizer", "8 B Adam moments (+4 B fp32 master weights in mixed precision)", p.gpu("optimizer")),
            ("activations", "grows with micro batch x sequence; ~4-8 B at typical sizes", p.gpu("activations")),
            ("buffers + overhead", "DeepSpeed buckets, CUDA context, allocator slack",
             p.gpu("buffers") + p.gpu("overhead"))]
    for what, rule, nbytes in rows:
        table.add_row(what, rule, human(nbytes), f"{nbytes / n:.2f}")
    table.add_row("[bold]total", "[bold]~16 B model states + activations: ~24 B/param",
                  f"[bold]{human(p.total_bytes)}", f"[bold]{p.total_bytes / n:.2f}")
    out.print(table)
    out.print(f"[dim]{count(n)} parameters x 24 B = {human(24 * n)} for full fine-tuning on one GPU by the rule "
              f"of thumb; PEFT keeps only the frozen weights ({spec.model.dtype}: "
              f"{2 if spec.model.dtype != 'float32' else 4} B/param, 4-bit NF4: ~0.52 B/param) and trains "
              f"{p.params.trainable / n:.2%} of them; ZeRO divides the model states by the GPU count.[/]",
              highlight=False)
