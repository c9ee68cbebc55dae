"""`orchestrator registry list | show | promote | export` and `orchestrator register`: registered
models and their versions."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.cli.common import _quiet_transformers, _registry_call, app, err

# --- registry: list, show, promote, export registered versions; register a finished run ---------

registry_app = typer.Typer(help="Registered models: list, show lineage, move aliases, export.",
                           no_args_is_help=True)
app.add_typer(registry_app, name="registry")
TrackingOption = typer.Option("sqlite:///mlflow.db", "--tracking-uri", help="MLflow tracking/registry URI.")


@registry_app.command("list")
def registry_list(tracking_uri: str = TrackingOption,
                  as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout.")):
    """Every registered model with its latest version, mode and aliases."""
    from orchestrator.tracking.registry import list_models
    from orchestrator.tracking.runs import resolve_tracking_uri

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
    from orchestrator.planning.units import human
    from orchestrator.tracking.registry import describe_version
    from orchestrator.tracking.runs import resolve_tracking_uri

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
                     if_better_than: Optional[str] = typer.Option(
                         None, "--if-better-than", help="Move the alias only if the version is not worse than "
                                                        "the one this alias names, both evaluated on the same data "
                                                        "(exit 1 otherwise)."),
                     metric: str = typer.Option("eval_loss", "--metric", help="The metric the gate compares: "
                                                "eval_loss, perplexity, exact_match, rougeL, chrf or bleu."),
                     data: Optional[str] = typer.Option(None, "--data", help="Held-out JSONL file for the gate "
                                                        "(default: the candidate's own eval data)."),
                     max_examples: Optional[int] = typer.Option(None, "--max-examples", min=1,
                                                                help="Evaluate the first N examples only."),
                     max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=0,
                                                        help="Tokens to generate per example."),
                     as_json: bool = typer.Option(False, "--json", help="Print the gate's result as JSON on stdout."),
                     tracking_uri: str = TrackingOption):
    """Point an alias (e.g. production) at a version; models:/NAME@ALIAS then loads it. With
    --if-better-than, only when an evaluation on the same data says it is not worse."""
    from orchestrator.tracking.registry import promote
    from orchestrator.tracking.runs import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if if_better_than is None:
        new, old = _registry_call(promote, uri, f"{name}/{version}", alias)
        moved = f" (was version {old})" if old and old != new else ""
        err.print(f"[green]ok[/] models:/{name}@{alias} -> version {new}{moved}", highlight=False)
        return
    from orchestrator.cli.evaluate import _evaluation_call, metrics_table
    from orchestrator.evaluation.gate import promote_if_better

    _quiet_transformers()
    result = _evaluation_call(promote_if_better, uri, name, version, alias, if_better_than, metric,
                              data_file=data, max_examples=max_examples, max_new_tokens=max_new_tokens)
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
    elif result.evaluation:
        Console().print(metrics_table(result.evaluation, f"{name}/{version} against {name}@{if_better_than} "
                                                         f"(version {result.incumbent})"))
    if result.incumbent is None:
        err.print(f"[green]ok[/] models:/{name}@{alias} -> version {version} ({if_better_than} pointed nowhere: "
                  "nothing to compare against)", highlight=False)
    elif result.promoted:
        err.print(f"[green]ok[/] models:/{name}@{alias} -> version {version} (was {result.previous}): {metric} "
                  f"{result.candidate_value:.4g} against {result.incumbent_value:.4g}; evidence: MLflow run "
                  f"{result.evaluation.run_id if result.evaluation else '-'}", highlight=False)
    else:
        err.print(f"[bold red]not promoted:[/] {name}/{version} is worse than {name}@{if_better_than} (version "
                  f"{result.incumbent}) on {metric}: {result.candidate_value:.4g} against "
                  f"{result.incumbent_value:.4g}; models:/{name}@{alias} stays at version {result.previous}. "
                  f"Evidence: MLflow run {result.evaluation.run_id}", highlight=False)
        raise typer.Exit(code=1)


@registry_app.command("export")
def registry_export(model: str = typer.Argument(..., help="NAME@ALIAS, NAME/VERSION or NAME (models:/ optional)."),
                    out_dir: Path = typer.Argument(..., help="Directory to write (created)."),
                    fmt: str = typer.Option("hf", "--format",
                                            help="hf: a plain transformers model (adapters are merged into "
                                                 "their base); adapter: the adapter files."),
                    tracking_uri: str = TrackingOption):
    """Write a registered version to a directory, for use outside MLflow."""
    from orchestrator.tracking.registry import export_model
    from orchestrator.tracking.runs import resolve_tracking_uri

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
    from orchestrator.models.inference import read_lineage, read_spec
    from orchestrator.tracking import registry, runs

    if mode not in ("adapter", "merged", "both"):
        err.print(f"[bold red]error:[/] --mode: '{mode}' is not a mode; use adapter, merged or both", highlight=False)
        raise typer.Exit(code=2)
    _quiet_transformers()
    uri = runs.resolve_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = _registry_call(registry.download_run_adapter, uri, run_id, tmp)
        spec = read_spec(adapter_dir)
        if alias:
            spec.registry.alias = alias
        handle = runs.run_handle(uri, run_id)
        version = _registry_call(lambda: registry.register_trained(
            handle, spec, adapter_dir, lineage=read_lineage(adapter_dir) or None, mode=mode,
            tags={"spec_hash": spec.spec_hash(), "base_model": spec.model.base}))
    linked = f" (and {version.linked})" if version.linked else ""
    err.print(f"[green]ok[/] registered {version.uri} = models:/{version.name}/{version.version} "
              f"({version.mode}){linked}", highlight=False)
