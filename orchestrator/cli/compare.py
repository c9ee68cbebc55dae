"""`orchestrator compare`: train the same job with each PEFT method in turn and compare them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from orchestrator.cli.common import (JobArg, SetOption, _fail, _load, _progress_bar, _quiet_transformers,
                                     _stdout_for_results_only, app, err)
from orchestrator.spec import SpecError


@app.command()
def compare(job: Path = JobArg, set_: Optional[List[str]] = SetOption,
            methods: str = typer.Option(",".join(("lora", "qlora", "ia3", "prompt_tuning", "prefix_tuning",
                                                  "adaption_prompt", "freeze", "full")), "--methods",
                                        help="Comma-separated presets: lora, qlora (LoRA on a 4-bit base), dora, ia3, "
                                             "prompt_tuning, prefix_tuning, adaption_prompt, freeze, full."),
            out: Optional[Path] = typer.Option(None, "--out", help="Where to write the table and plot "
                                                                   "(default: compare/NAME-RUNID)."),
            address: Optional[str] = typer.Option(None, help="Ray cluster address (default: start a local Ray)."),
            as_json: bool = typer.Option(False, "--json", help="Print the comparison as one JSON object on stdout.")):
    """Train the same job with each PEFT method in turn and compare them in one table and plot
    (an MLflow parent run with one child run per method; nothing is registered)."""
    from orchestrator.search.compare import COLUMNS, compare_methods, table_rows

    _load(job, set_)
    _quiet_transformers()
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    bar, on_progress = _progress_bar()

    with _stdout_for_results_only():  # until Ray is shut down
        try:
            result = compare_methods(job, chosen, set_ or [], out_dir=out, address=address, progress=on_progress,
                                     status=lambda s: err.print(f"[dim]•[/] {escape(s)}", highlight=False))
        except SpecError as e:
            _fail(e)
        finally:
            bar.stop()
            from orchestrator.training.launch import shutdown

            shutdown()
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
        return
    table = Table(title=f"PEFT methods compared (MLflow parent run {result.parent_run_id})", title_justify="left")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "method" else "right")
    for row in table_rows(result.results):
        table.add_row(*row)
    out_console = Console(width=max(Console().width, 150))  # the table's nine columns, even in a pipe
    out_console.print(table)
    out_console.print(f"[dim]measured peak = {result.memory_kind}; planned peak = `orchestrator plan` per GPU. "
                      f"Table, CSV and plot: {result.out_dir}[/]", highlight=False)
    done = [r for r in result.results if not r.error and r.final_eval_loss is not None]
    if done:
        from orchestrator.search.compare import run_command

        best = min(done, key=lambda r: r.final_eval_loss)
        out_console.print(f"lowest eval loss: {best.method}; train and register it with:\n"
                          f"  {run_command(job, best.method, set_ or [])}", highlight=False, markup=False)
