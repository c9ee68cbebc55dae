"""What every command group of the CLI shares: the app, the error console, the JOB and --set
arguments, loading a job (problems exit 2), and keeping stdout for results while Ray runs."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from orchestrator.spec import JobSpec, SpecError, load_spec

app = typer.Typer(
    help="Parameter-efficient fine-tuning (LoRA/QLoRA/DoRA, IA3, prompt and prefix tuning, LLaMA-Adapter, "
         "freeze, full) on Ray with DeepSpeed ZeRO, tracked and "
         "registered in MLflow. Every command that takes a JOB file also takes "
         "--set dotted.path=value overrides.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    # Markdown: a docstring's paragraph reads as one paragraph in --help (rich mode kept its
    # source line breaks), `code` shows as code; write `<...>` inside backticks.
    rich_markup_mode="markdown")
err = Console(stderr=True)

SetOption = typer.Option(None, "--set", "-s", help="Override a spec value: dotted.path=value (repeatable).")
JobArg = typer.Argument(..., help="The job file (YAML).", exists=False)


def _load(job: Path, overrides: Optional[List[str]]) -> JobSpec:
    """Load a spec, or print one line per problem and exit 2 (a user mistake, not our bug)."""
    try:
        spec = load_spec(job, overrides or [])
        if spec.tune is not None:
            from orchestrator.search.recipe import check_space

            check_space(spec)
        return spec
    except SpecError as e:
        e.source = e.source or str(job)
        _fail(e)


def _gpu_memory(text: Optional[str]) -> Optional[int]:
    """Parse a --gpu-memory size (e.g. 80GiB), or exit 2 with the reason."""
    from orchestrator.planning.units import parse_bytes

    try:
        return parse_bytes(text) if text is not None else None
    except ValueError as e:
        err.print(f"[bold red]error:[/] --gpu-memory: {e}", highlight=False)
        raise typer.Exit(code=2)


def _quiet_transformers() -> None:
    """No weight-loading progress bars or notices from transformers around our own output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@contextlib.contextmanager
def _stdout_for_results_only():
    """While Ray runs, whatever would reach stdout (Ray's "(raylet) ..." notices, printed from a
    driver thread; a library's print; a child process's output) goes to stderr instead, so that
    stdout holds only the command's result: the --json object, the summary table."""
    sys.stdout.flush()
    try:
        fd, to = sys.stdout.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's captured stdout)
        fd = to = None
    saved = os.dup(fd) if fd is not None else None
    if saved is not None:
        os.dup2(to, fd)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None:
            sys.stdout.flush()
            os.dup2(saved, fd)
            os.close(saved)


def _fail(e: SpecError):
    where = f" in {e.source}" if e.source else ""
    err.print(f"[bold red]error:[/] {len(e.problems)} problem(s){where}", highlight=False)
    for p in e.problems:
        err.print(f"  {p}", highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(code=2)


def measured(value) -> bool:
    """A metric that was measured: a run without eval examples has NaN (or no) eval loss."""
    return value is not None and value == value


# What the training bar shows beside the step count: the latest known of each.
BAR_METRICS = ("train_loss", "grad_norm", "eval_loss")


def _progress_bar():
    """A progress display on stderr, and the `progress(label, done, total, metrics)` callback
    that adds one bar per label (pre-training, training) and shows the latest losses and gradient norm."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # Redrawn twice a second, as often as the driver polls the workers' progress: rich's default
    # 10 redraws cost 1% of a core over a run (measured: 103 ms of CPU per 10 s, 21 at 2 a second),
    # taken from the training workers on a small node.
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=err, refresh_per_second=2)
    tasks: dict[str, int] = {}

    def on_progress(label: str, done: int, total: int | None, metrics: dict) -> None:
        if label not in tasks:
            bar.start()
            tasks[label] = bar.add_task(label, total=total, info="")
        info = "  ".join(f"{k} {metrics[k]:.3f}" for k in BAR_METRICS if measured(metrics.get(k)))
        bar.update(tasks[label], completed=done, info=info)

    return bar, on_progress


def _registry_call(fn, *args):
    """Run a registry lookup; an unknown name, alias or version is a user mistake (exit 2)."""
    from orchestrator.tracking.registry import lookup_errors

    errors = lookup_errors()  # MLflow's own exception among them: only tracking imports mlflow
    try:
        return fn(*args)
    except errors as e:
        message = getattr(e, "message", None) or str(e)
        err.print("[bold red]error:[/] ", end="")
        err.print(message.splitlines()[0], highlight=False, markup=False)
        raise typer.Exit(code=2)
