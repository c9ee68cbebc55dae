"""The `orchestrator` command line: validate, run, generate."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.spec import JobSpec, SpecError, load_spec

app = typer.Typer(
    help="Parameter-efficient fine-tuning (QLoRA/LoRA) on Ray with DeepSpeed ZeRO, tracked and "
         "registered in MLflow. Every command that takes a JOB file also takes "
         "--set dotted.path=value overrides.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
err = Console(stderr=True)

SetOption = typer.Option(None, "--set", "-s", help="Override a spec value: dotted.path=value (repeatable).")
JobArg = typer.Argument(..., help="The job file (YAML).", exists=False)


def _load(job: Path, overrides: Optional[List[str]]) -> JobSpec:
    """Load a spec, or print one line per problem and exit 2 (a user mistake, not our bug)."""
    try:
        return load_spec(job, overrides or [])
    except SpecError as e:
        _fail(e)


def _fail(e: SpecError):
    where = f" in {e.source}" if e.source else ""
    err.print(f"[bold red]error:[/] {len(e.problems)} problem(s){where}", highlight=False)
    for p in e.problems:
        err.print(f"  {p}", highlight=False, markup=False)
    raise typer.Exit(code=2)


@app.command()
def validate(job: Path = JobArg, set_: Optional[List[str]] = SetOption,
             show: bool = typer.Option(False, "--show", help="Print the full spec with defaults.")):
    """Check a job file; exit 0 if valid, else list every problem and exit 2."""
    spec = _load(job, set_)
    if show:
        typer.echo(spec.to_yaml())
    err.print(f"[green]ok[/] {job}: job '{spec.name}' (spec hash {spec.spec_hash()})")


@app.command()
def run(job: Path = JobArg, set_: Optional[List[str]] = SetOption,
        address: Optional[str] = typer.Option(None, help="Ray cluster address (default: start a local Ray)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON summary object on stdout."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Ray and worker logs.")):
    """Fine-tune: train the job on Ray, track it in MLflow, register the adapter."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from orchestrator.run import run_job

    spec = _load(job, set_)
    bar = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn(), console=err, transient=False)
    task = None

    def on_progress(step: int, total: int, metrics: dict) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task("train", total=total, info="")
        info = "  ".join(f"{k} {metrics[k]:.3f}" for k in ("train_loss", "eval_loss") if k in metrics)
        bar.update(task, completed=step, info=info)

    try:
        summary = run_job(spec, address=address, verbose=verbose, progress=on_progress,
                          status=lambda s: err.print(f"[dim]•[/] {s}", highlight=False))
    except SpecError as e:
        _fail(e)
    finally:
        bar.stop()
        from orchestrator.launch import shutdown

        shutdown()
    if as_json:
        typer.echo(json.dumps(summary.to_json(), indent=2))
        return
    _print_summary(summary)


def _print_summary(s) -> None:
    from orchestrator.tracking import ui_command

    out = Console()
    m = s.metrics
    table = Table(title="Fine-tuning summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("eval loss", f"{m['base_eval_loss']:.4f} (base) -> {m['eval_loss']:.4f} (fine-tuned), "
                               f"x{m['eval_loss'] / m['base_eval_loss']:.2f}")
    table.add_row("train loss", f"{m['train_loss']:.4f}")
    table.add_row("throughput", f"{m['tokens_per_s']:.0f} tokens/s")
    table.add_row("wall time", f"{m['wall_s']:.1f} s")
    table.add_row("MLflow run", f"{s.run_id} (experiment '{s.experiment}')")
    table.add_row("registered", s.registered_model["uri"] + f"  (version {s.registered_model['version']})")
    table.add_row("MLflow UI", ui_command(s.tracking_uri))
    table.add_row("try it", f'orchestrator generate {s.registered_model["uri"]} "YOUR PROMPT"')
    out.print(table)


@app.command()
def generate(model: str = typer.Argument(..., help="models:/NAME@ALIAS, models:/NAME/VERSION, or an adapter directory."),
             prompt: str = typer.Argument(..., help="The prompt (for alpaca-format adapters: instruction, "
                                                    "then optionally a newline and the input)."),
             max_new_tokens: int = typer.Option(64, help="Tokens to generate."),
             tracking_uri: str = typer.Option("sqlite:///mlflow.db", help="MLflow tracking URI for models:/ URIs."),
             base: bool = typer.Option(False, "--base", help="Answer with the bare base model, for comparison.")):
    """Complete a prompt with a registered (or local) adapter and its base model."""
    from orchestrator.inference import complete, load_adapter

    with tempfile.TemporaryDirectory() as tmp:
        if model.startswith("models:/"):
            from orchestrator.tracking import download_model

            try:
                adapter_dir = download_model(model, tmp, tracking_uri)
            except Exception as e:  # MLflow's own message says which name/alias is unknown
                err.print(f"[bold red]error:[/] cannot load {model} from {tracking_uri}: {e}", highlight=False)
                raise typer.Exit(code=2)
        else:
            adapter_dir = Path(model)
            if not adapter_dir.is_dir():
                err.print(f"[bold red]error:[/] {model}: no such adapter directory; pass models:/NAME@ALIAS "
                          "or a directory written by `orchestrator run`", highlight=False)
                raise typer.Exit(code=2)
        loaded = load_adapter(adapter_dir, with_adapter=not base)
        typer.echo(complete(loaded, prompt, max_new_tokens=max_new_tokens))


def main() -> None:
    app(prog_name="orchestrator")


if __name__ == "__main__":
    sys.exit(main())
