"""`orchestrator validate | run | resume`: check a job, run it (or its search) with a progress bar
or a live trials table, resume a stopped one, and print the summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.cli.common import (JobArg, SetOption, _fail, _gpu_memory, _load, _progress_bar, measured,
                                     _quiet_transformers, _registry_call, _stdout_for_results_only, app, err)
from orchestrator.spec import JobSpec, SpecError


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
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Ray and worker logs."),
        force: bool = typer.Option(False, "--force", help="Run even if the memory plan says the job does not fit."),
        gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory",
                                                 help="Memory of one GPU for the fit check, e.g. 80GiB "
                                                      "(default: the local GPU, else 80 GiB)."),
        restart: bool = typer.Option(False, "--restart",
                                     help="Start afresh even if this job's last run (or search) stopped "
                                          "unfinished (by default it resumes: a run from its last checkpoint, a "
                                          "search without re-running finished trials)."),
        confined: bool = typer.Option(False, "--confined",
                                      help="Refuse data and model paths outside the job file's directory and "
                                           "relative output paths that climb out of the working directory "
                                           "(how submitted jobs run).")):
    """Fine-tune: plan memory, train the job on Ray, track it in MLflow, register the adapter.

    If the job's last run stopped unfinished (driver killed, node lost), this resumes it from its
    last checkpoint, in the same MLflow run. A job with a tune: section runs a hyperparameter
    search and registers its best trial."""
    from orchestrator.search.recipe import run_spec

    spec = _load(job, set_)
    if confined:
        from orchestrator.cluster.submission import confinement_problems

        if problems := confinement_problems(spec, job.parent, Path.cwd()):
            _fail(SpecError(problems, str(job)))
    _run(lambda **kw: run_spec(spec, **kw), spec, address=address, as_json=as_json, verbose=verbose, force=force,
         gpu_memory=gpu_memory, restart=restart)


@app.command()
def resume(name: str = typer.Argument(..., help="The job name (its `name:`, the MLflow run name)."),
           tracking_uri: str = typer.Option("sqlite:///mlflow.db", "--tracking-uri",
                                            help="MLflow tracking URI the job was tracked in."),
           address: Optional[str] = typer.Option(None, help="Ray cluster address (default: start a local Ray)."),
           as_json: bool = typer.Option(False, "--json", help="Print one JSON summary object on stdout."),
           verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Ray and worker logs.")):
    """Resume the job NAME whose last run stopped unfinished, with the job spec that run was
    started with (run it from the same directory as the first run): a run continues from its last
    checkpoint, a search without re-running its finished trials."""
    from orchestrator.search.recipe import resume as resume_search
    from orchestrator.search.recipe import run_spec
    from orchestrator.tracking.runs import resolve_tracking_uri, stopped_run_spec

    _, spec = _registry_call(stopped_run_spec, resolve_tracking_uri(tracking_uri), name)
    if spec.tune is not None:
        _run(lambda **kw: resume_search(name, tracking_uri, **kw), None, address=address, as_json=as_json,
             verbose=verbose, force=False, gpu_memory=None, restart=False)
        return
    # The run it continues passed (or was forced past) the memory check when it started.
    _run(lambda **kw: run_spec(spec, **kw), spec, address=address, as_json=as_json, verbose=verbose, force=True,
         gpu_memory=None, restart=False)


def _run(call, spec: Optional[JobSpec], *, address, as_json: bool, verbose: bool, force: bool,
         gpu_memory: Optional[str], restart: bool) -> None:
    """Run a job (or resume a search) with a progress bar or a live trials table, then print
    its summary; user mistakes exit 2."""
    from rich.live import Live

    from orchestrator.training.recipe import DoesNotFit

    budget = _gpu_memory(gpu_memory)
    bar, on_progress = _progress_bar()

    live = Live(console=err, refresh_per_second=2, transient=False)

    def on_trials(trials: list) -> None:
        if not live.is_started:
            live.start()
        live.update(_trials_table(trials, title="Trials"))

    with _stdout_for_results_only():  # until Ray is shut down
        try:
            summary = call(address=address, verbose=verbose, force=force, gpu_memory_bytes=budget,
                           progress=on_progress, restart=restart, on_trials=on_trials,
                           status=lambda s: err.print(f"[dim]•[/] {s}", highlight=False))
        except SpecError as e:
            live.stop()
            _fail(e)
        except DoesNotFit as e:
            bar.stop()
            if spec is not None:
                from orchestrator.cli.plan import _print_plan  # imported here: plan registers its command last

                _print_plan(spec, e.plan, explain=False)
            err.print("[bold red]error:[/] refusing to start a job that cannot fit (see the plan and the changes "
                      "above); pass --force to run anyway", highlight=False)
            raise typer.Exit(code=2)
        finally:
            live.stop()
            bar.stop()
            from orchestrator.training.launch import shutdown

            shutdown()
    promotion = _promote_after_run(spec, summary)
    if as_json:
        typer.echo(json.dumps({**summary.to_json(), **({"promotion": promotion.to_json()} if promotion else {})},
                              indent=2))
        return
    if summary.trials is not None:
        Console().print(_trials_table(summary.trials, title="Trials, best first"))
    _print_summary(summary)


def _promote_after_run(spec: Optional[JobSpec], summary):
    """The job's registry.promote gate on the version the run registered, reported on stderr."""
    if spec is None or spec.registry.promote is None or not summary.registered_model:
        return None
    from orchestrator.cli.evaluate import _evaluation_call
    from orchestrator.evaluation.gate import promote_after_run

    _quiet_transformers()
    gate = spec.registry.promote
    err.print(f"[dim]•[/] Promotion gate: {summary.registered_model['name']}/{summary.registered_model['version']} "
              f"against @{gate.against} on {gate.metric}", highlight=False)
    result = _evaluation_call(promote_after_run, spec, summary.registered_model, summary.tracking_uri)
    name = summary.registered_model["name"]
    if result.promoted:
        err.print(f"[green]ok[/] models:/{name}@{gate.alias} -> version {result.version}", highlight=False)
    else:
        err.print(f"[yellow]not promoted:[/] version {result.version} is worse than @{gate.against} (version "
                  f"{result.incumbent}) on {gate.metric}: {result.candidate_value:.4g} against "
                  f"{result.incumbent_value:.4g}; evidence: MLflow run {result.evaluation.run_id}", highlight=False)
    return result


# How the summary groups the run's phases (see training.recipe.PHASES).
_TIME_GROUPS = {"start Ray": ("ray_start",), "start workers": ("worker_start",),
                "load model": ("resolve_base", "setup"), "data": ("data",), "train": ("steps",),
                "evaluate": ("eval",), "log+report": ("log", "report"), "checkpoint": ("checkpoint", "finish"),
                "register": ("register",)}


def time_breakdown(timings: dict) -> str:
    parts = [f"{label} {sum(timings.get(p, 0.0) for p in phases):.1f} s" for label, phases in _TIME_GROUPS.items()]
    return " · ".join(parts)


def _trials_table(trials: list, title: str, metric: str = "eval_loss") -> Table:
    """Trials (records while the search runs, or the summary's dicts) as a rich table."""
    from orchestrator.planning.units import human

    rows = [t if isinstance(t, dict) else t.to_json(metric) for t in trials]
    paths = sorted({p for r in rows for p in r["params"]})
    table = Table(title=title, title_justify="left")
    for col in ("trial", "state", *paths, "planned peak", "step", "metric"):
        table.add_column(col, justify="right" if col in ("planned peak", "step", "metric") else "left")
    for r in rows:
        metric, peak = r.get("metric"), r.get("planned_peak_bytes")
        table.add_row(r["trial_id"], r["state"], *(_short(r["params"].get(p)) for p in paths),
                      human(peak) if peak is not None else "-",
                      str(r.get("step") if r.get("step") is not None else "-"),
                      f"{metric:.4f}" if isinstance(metric, (int, float)) else "-")
    return table


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return ",".join(value) if isinstance(value, list) else str(value)


def _print_summary(s) -> None:
    from orchestrator.tracking.runs import ui_command

    out = Console()
    m = s.metrics
    table = Table(title="Fine-tuning summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    if measured(m.get("eval_loss")) and measured(m.get("base_eval_loss")):
        table.add_row("eval loss", f"{m['base_eval_loss']:.4f} (base) -> {m['eval_loss']:.4f} (fine-tuned), "
                                   f"{100 * (1 - m['eval_loss'] / m['base_eval_loss']):.1f}% lower")
    else:
        table.add_row("eval loss", "not evaluated: no eval examples (data.eval)")
    table.add_row("train loss", f"{m['train_loss']:.4f}")
    d = s.data
    table.add_row("data", f"{d.get('train_examples')} train / {d.get('eval_examples')} eval examples, "
                          f"{d.get('truncated_examples', 0)} truncated to data.max_seq_len"
                          + (f", {d['dropped_examples']} dropped (nothing to train)" if d.get("dropped_examples") else ""))
    share = m.get("real_token_share")
    table.add_row("throughput", f"{m['tokens_per_s']:.0f} tokens/s"
                  + (f", {share:.0%} of each batch real tokens (the rest padding)" if share else ""))
    table.add_row("wall time", f"{m['wall_s']:.1f} s")
    if s.timings:
        table.add_row("where it went", time_breakdown(s.timings))
    table.add_row("MLflow run", f"{s.run_id} (experiment '{s.experiment}')")
    table.add_row("registered", s.registered_model["uri"] + f"  (version {s.registered_model['version']})")
    table.add_row("MLflow UI", ui_command(s.tracking_uri))
    table.add_row("try it", f'orchestrator generate {s.registered_model["uri"]} "YOUR PROMPT"')
    out.print(table)
