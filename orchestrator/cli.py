"""The `orchestrator` command line: validate, run, generate, register, registry."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from orchestrator.spec import JobSpec, SpecError, load_spec

app = typer.Typer(
    help="Parameter-efficient fine-tuning (LoRA/QLoRA/DoRA, IA3, prompt and prefix tuning, LLaMA-Adapter, "
         "freeze, full) on Ray with DeepSpeed ZeRO, tracked and "
         "registered in MLflow. Every command that takes a JOB file also takes "
         "--set dotted.path=value overrides.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
err = Console(stderr=True)

SetOption = typer.Option(None, "--set", "-s", help="Override a spec value: dotted.path=value (repeatable).")
JobArg = typer.Argument(..., help="The job file (YAML).", exists=False)


def _load(job: Path, overrides: Optional[List[str]]) -> JobSpec:
    """Load a spec, or print one line per problem and exit 2 (a user mistake, not our bug)."""
    try:
        spec = load_spec(job, overrides or [])
        if spec.tune is not None:
            from orchestrator.search_job import check_space

            check_space(spec)
        return spec
    except SpecError as e:
        e.source = e.source or str(job)
        _fail(e)


def _gpu_memory(text: Optional[str]) -> Optional[int]:
    """Parse a --gpu-memory size (e.g. 80GiB), or exit 2 with the reason."""
    from orchestrator.memory_plan import parse_bytes

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
    from orchestrator.run import run_job

    spec = _load(job, set_)
    if confined:
        from orchestrator.submission import confinement_problems

        if problems := confinement_problems(spec, job.parent, Path.cwd()):
            _fail(SpecError(problems, str(job)))
    _run(lambda **kw: run_job(spec, **kw), spec, address=address, as_json=as_json, verbose=verbose, force=force,
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
    from orchestrator.run import run_job
    from orchestrator.search_job import resume as resume_search
    from orchestrator.tracking import resolve_tracking_uri, stopped_run_spec

    _, spec = _registry_call(stopped_run_spec, resolve_tracking_uri(tracking_uri), name)
    if spec.tune is not None:
        _run(lambda **kw: resume_search(name, tracking_uri, **kw), None, address=address, as_json=as_json,
             verbose=verbose, force=False, gpu_memory=None, restart=False)
        return
    # The run it continues passed (or was forced past) the memory check when it started.
    _run(lambda **kw: run_job(spec, **kw), spec, address=address, as_json=as_json, verbose=verbose, force=True,
         gpu_memory=None, restart=False)


def _run(call, spec: Optional[JobSpec], *, address, as_json: bool, verbose: bool, force: bool,
         gpu_memory: Optional[str], restart: bool) -> None:
    """Run a job (or resume a search) with a progress bar or a live trials table, then print
    its summary; user mistakes exit 2."""
    from rich.live import Live

    from orchestrator.run import DoesNotFit

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
                _print_plan(spec, e.plan, explain=False)
            err.print("[bold red]error:[/] refusing to start a job that cannot fit (see the plan and the changes "
                      "above); pass --force to run anyway", highlight=False)
            raise typer.Exit(code=2)
        finally:
            live.stop()
            bar.stop()
            from orchestrator.launch import shutdown

            shutdown()
    if as_json:
        typer.echo(json.dumps(summary.to_json(), indent=2))
        return
    if summary.trials is not None:
        Console().print(_trials_table(summary.trials, title="Trials, best first"))
    _print_summary(summary)


# How the summary groups the run's phases (see run.PHASES).
_TIME_GROUPS = {"start Ray": ("ray_start",), "start workers": ("worker_start",),
                "load model": ("resolve_base", "setup"), "data": ("data",), "train": ("steps",),
                "evaluate": ("eval",), "log+report": ("log", "report"), "checkpoint": ("checkpoint", "finish"),
                "register": ("register",)}


def time_breakdown(timings: dict) -> str:
    parts = [f"{label} {sum(timings.get(p, 0.0) for p in phases):.1f} s" for label, phases in _TIME_GROUPS.items()]
    return " · ".join(parts)


def _progress_bar():
    """A progress display on stderr, and the `progress(label, done, total, metrics)` callback
    that adds one bar per label (pre-training, training) and shows the latest losses."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=err)
    tasks: dict[str, int] = {}

    def on_progress(label: str, done: int, total: int, metrics: dict) -> None:
        if label not in tasks:
            bar.start()
            tasks[label] = bar.add_task(label, total=total, info="")
        info = "  ".join(f"{k} {metrics[k]:.3f}" for k in ("train_loss", "eval_loss") if k in metrics)
        bar.update(tasks[label], completed=done, info=info)

    return bar, on_progress


def _trials_table(trials: list, title: str, metric: str = "eval_loss") -> Table:
    """Trials (records while the search runs, or the summary's dicts) as a rich table."""
    rows = [t if isinstance(t, dict) else t.to_json(metric) for t in trials]
    paths = sorted({p for r in rows for p in r["params"]})
    table = Table(title=title, title_justify="left")
    for col in ("trial", "state", *paths, "step", "metric"):
        table.add_column(col, justify="right" if col in ("step", "metric") else "left")
    for r in rows:
        metric = r.get("metric")
        table.add_row(r["trial_id"], r["state"], *(_short(r["params"].get(p)) for p in paths),
                      str(r.get("step") if r.get("step") is not None else "-"),
                      f"{metric:.4f}" if isinstance(metric, (int, float)) else "-")
    return table


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return ",".join(value) if isinstance(value, list) else str(value)


def _print_summary(s) -> None:
    from orchestrator.tracking import ui_command

    out = Console()
    m = s.metrics
    table = Table(title="Fine-tuning summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("eval loss", f"{m['base_eval_loss']:.4f} (base) -> {m['eval_loss']:.4f} (fine-tuned), "
                               f"{100 * (1 - m['eval_loss'] / m['base_eval_loss']):.1f}% lower")
    table.add_row("train loss", f"{m['train_loss']:.4f}")
    d = s.data
    table.add_row("data", f"{d.get('train_examples')} train / {d.get('eval_examples')} eval examples, "
                          f"{d.get('truncated_examples', 0)} truncated to data.max_seq_len")
    table.add_row("throughput", f"{m['tokens_per_s']:.0f} tokens/s")
    table.add_row("wall time", f"{m['wall_s']:.1f} s")
    if s.timings:
        table.add_row("where it went", time_breakdown(s.timings))
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

    _quiet_transformers()

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
    from orchestrator.compare import COLUMNS, compare_methods, table_rows

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
            from orchestrator.launch import shutdown

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
        from orchestrator.compare import run_command

        best = min(done, key=lambda r: r.final_eval_loss)
        out_console.print(f"lowest eval loss: {best.method}; train and register it with:\n"
                          f"  {run_command(job, best.method, set_ or [])}", highlight=False, markup=False)


# --- registry: list, show, promote, export registered versions; register a finished run ---------

registry_app = typer.Typer(help="Registered models: list, show lineage, move aliases, export.",
                           no_args_is_help=True)
app.add_typer(registry_app, name="registry")
TrackingOption = typer.Option("sqlite:///mlflow.db", "--tracking-uri", help="MLflow tracking/registry URI.")


def _registry_call(fn, *args):
    """Run a registry lookup; an unknown name, alias or version is a user mistake (exit 2)."""
    from mlflow.exceptions import MlflowException

    try:
        return fn(*args)
    except (MlflowException, LookupError, ValueError) as e:
        message = getattr(e, "message", None) or str(e)
        err.print(f"[bold red]error:[/] {message.splitlines()[0]}", highlight=False, markup=False)
        raise typer.Exit(code=2)


@registry_app.command("list")
def registry_list(tracking_uri: str = TrackingOption,
                  as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout.")):
    """Every registered model with its latest version, mode and aliases."""
    from orchestrator.tracking import list_models, resolve_tracking_uri

    models = _registry_call(list_models, resolve_tracking_uri(tracking_uri))
    if as_json:
        typer.echo(json.dumps(models, indent=2))
        return
    table = Table(title="Registered models", title_justify="left")
    for col in ("name", "latest", "mode", "aliases"):
        table.add_column(col)
    for m in models:
        table.add_row(m["name"], str(m["latest_version"]), m["mode"],
                      ", ".join(f"{a} -> {v}" for a, v in m["aliases"].items()))
    Console().print(table)


@registry_app.command("show")
def registry_show(model: str = typer.Argument(..., help="NAME, NAME@ALIAS or NAME/VERSION (models:/ optional)."),
                  tracking_uri: str = TrackingOption,
                  spec: bool = typer.Option(False, "--spec", help="Also print the job spec it was trained from."),
                  as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout.")):
    """One version's lineage: run, job spec hash, data and base hashes, metrics, mode, size."""
    from orchestrator.memory_plan import human
    from orchestrator.tracking import describe_version, resolve_tracking_uri

    d = _registry_call(describe_version, resolve_tracking_uri(tracking_uri), model)
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    tags, run_tags = d["tags"], d["run_tags"]
    table = Table(title=f"{d['uri']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    rows = [("aliases", ", ".join(d["aliases"]) or "-"), ("mode", d["mode"]), ("size", human(d["size_bytes"]) if d["size_bytes"] else "-"),
            ("run", f"{d['run_id']} ({d['run_status']})"),
            ("job spec hash", tags.get("spec_hash", run_tags.get("spec_hash", "-"))),
            ("base", f"{tags.get('base_model', '-')} (revision {tags.get('base_revision', 'default')})"),
            ("base sha256", tags.get("base_sha256", "-"))]
    rows += [(f"data {k.split('.')[-1].removesuffix('_sha256')} sha256", v)
             for k, v in sorted(run_tags.items()) if k.startswith("data.")]
    rows += [(f"linked {k.removesuffix('_version')}", tags[k]) for k in ("merged_version", "adapter_version")
             if k in tags]
    rows += [(k, f"{v:.4g}") for k, v in d["metrics"].items()
             if k in ("eval_loss", "final_eval_loss", "train_loss", "tokens_per_s", "wall_s")]
    for k, v in rows:
        table.add_row(k, str(v))
    Console().print(table)
    if spec and d["job_spec"]:
        typer.echo(d["job_spec"])


@registry_app.command("promote")
def registry_promote(name: str = typer.Argument(..., help="Registered model name."),
                     version: str = typer.Argument(..., help="Version number to promote."),
                     alias: str = typer.Option("production", "--alias", help="Alias to point at the version."),
                     tracking_uri: str = TrackingOption):
    """Point an alias (e.g. production) at a version; models:/NAME@ALIAS then loads it."""
    from orchestrator.tracking import promote, resolve_tracking_uri

    new, old = _registry_call(promote, resolve_tracking_uri(tracking_uri), f"{name}/{version}", alias)
    moved = f" (was version {old})" if old and old != new else ""
    err.print(f"[green]ok[/] models:/{name}@{alias} -> version {new}{moved}", highlight=False)


@registry_app.command("export")
def registry_export(model: str = typer.Argument(..., help="NAME@ALIAS, NAME/VERSION or NAME (models:/ optional)."),
                    out_dir: Path = typer.Argument(..., help="Directory to write (created)."),
                    fmt: str = typer.Option("hf", "--format",
                                            help="hf: a plain transformers model (adapters are merged into "
                                                 "their base); adapter: the adapter files."),
                    tracking_uri: str = TrackingOption):
    """Write a registered version to a directory, for use outside MLflow."""
    from orchestrator.tracking import export_model, resolve_tracking_uri

    if fmt not in ("hf", "adapter"):
        err.print(f"[bold red]error:[/] --format: '{fmt}' is not a format; use hf or adapter", highlight=False)
        raise typer.Exit(code=2)
    _quiet_transformers()
    out = _registry_call(export_model, resolve_tracking_uri(tracking_uri), model, out_dir, fmt)
    err.print(f"[green]ok[/] {model} -> {out} ({fmt})", highlight=False)


@app.command()
def register(run_id: str = typer.Argument(..., help="The MLflow run id of a finished `orchestrator run`."),
             mode: str = typer.Option("adapter", "--mode", help="adapter, merged, or both."),
             alias: Optional[str] = typer.Option(None, "--alias", help="Alias to set (default: the job's)."),
             tracking_uri: str = TrackingOption):
    """Register a finished run's adapter again, e.g. as a merged model, without retraining."""
    from orchestrator import tracking
    from orchestrator.inference import read_lineage, read_spec

    if mode not in ("adapter", "merged", "both"):
        err.print(f"[bold red]error:[/] --mode: '{mode}' is not a mode; use adapter, merged or both", highlight=False)
        raise typer.Exit(code=2)
    _quiet_transformers()
    uri = tracking.resolve_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = _registry_call(tracking.download_run_adapter, uri, run_id, tmp)
        spec = read_spec(adapter_dir)
        if alias:
            spec.registry.alias = alias
        handle = tracking.run_handle(uri, run_id)
        version = _registry_call(lambda: tracking.register_trained(
            handle, spec, adapter_dir, lineage=read_lineage(adapter_dir) or None, mode=mode,
            tags={"spec_hash": spec.spec_hash(), "base_model": spec.model.base}))
    linked = f" (and {version.linked})" if version.linked else ""
    err.print(f"[green]ok[/] registered {version.uri} = models:/{version.name}/{version.version} "
              f"({version.mode}){linked}", highlight=False)


from orchestrator.cluster_cli import jobs_app, k8s_app, submit  # noqa: E402  (cluster commands)

app.command()(submit)
app.add_typer(jobs_app, name="jobs")
app.add_typer(k8s_app, name="k8s")


# --- plan: memory before any GPU is spent (orchestrator/memory_plan.py) ---------------------------


@app.command()
def plan(job: Path = JobArg, set_: Optional[List[str]] = SetOption,
         gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Memory of one GPU, e.g. 80GiB or 40GB "
                                                                            "(default: the local GPU, else 80 GiB)."),
         num_gpus: Optional[int] = typer.Option(None, "--num-gpus", min=1,
                                                help="GPUs to shard over (default: distributed.num_workers)."),
         as_json: bool = typer.Option(False, "--json", help="Print the plan as one JSON object on stdout."),
         explain: bool = typer.Option(False, "--explain", help="Show where each byte goes, beside the rule of thumb.")):
    """Plan the GPU and host memory of a job without a GPU; exit 0 if it fits, 1 if it does not."""
    from orchestrator.memory_plan import architecture_for, gpu_budget, memory_plan

    spec = _load(job, set_)
    budget = _gpu_memory(gpu_memory)
    budget, source = gpu_budget(budget)
    try:
        arch = architecture_for(spec)
    except SpecError as e:
        _fail(e)
    result = memory_plan(spec, arch, world_size=num_gpus or spec.distributed.num_workers,
                         gpu_memory_bytes=budget, gpu_memory_source=source)
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
    else:
        _print_plan(spec, result, explain)
    raise typer.Exit(code=0 if result.fits else 1)


def _print_plan(spec: JobSpec, p, explain: bool) -> None:
    from orchestrator.memory_plan import count, human

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
    from orchestrator.memory_plan import count, human

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


def main() -> None:
    import atexit
    import gc
    import logging
    import warnings

    # Registered first, so it runs last (after Ray's and MLflow's exit handlers): the objects left
    # at exit (torch, transformers, MLflow, the tokenized data) are set aside from the collections
    # the interpreter runs while it shuts down, which took 1.5-2 s after a quickstart run (the
    # process exits at once now; docs/benchmarks.md).
    atexit.register(gc.freeze)

    # Library notices that users cannot act on (an optional bitsandbytes kernel package, a
    # transformers deprecation inside peft) stay out of the console; errors still show.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    app(prog_name="orchestrator")


if __name__ == "__main__":
    sys.exit(main())
