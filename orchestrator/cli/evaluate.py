"""`orchestrator evaluate`: a registered version's loss, perplexity and generation metrics on
held-out data, optionally side by side with another version; logged to MLflow."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.cli.common import _fail, _quiet_transformers, _registry_call, app, err
from orchestrator.spec import SpecError


def _evaluation_call(fn, *args, **kwargs):
    """A registry lookup or data problem is a user mistake (exit 2), not our bug."""
    try:
        return _registry_call(lambda: fn(*args, **kwargs))
    except SpecError as e:
        _fail(e)


def metrics_table(evaluation, title: str) -> Table:
    """The metrics of each evaluated version, side by side (with the difference for two)."""
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    for r in evaluation.results:
        table.add_column(r.uri.removeprefix("models:/"), justify="right")
    comparison = evaluation.comparison()
    if comparison:
        table.add_column("difference", justify="right")
    for metric in evaluation.results[0].metrics:
        row = [metric] + [f"{r.metrics.get(metric, float('nan')):.4g}" for r in evaluation.results]
        if comparison and metric in comparison:
            c = comparison[metric]
            row.append(f"{c['difference']:+.4g}" + ("" if c["not_worse"] else " (worse)"))
        table.add_row(*row)
    return table


@app.command()
def evaluate(model: str = typer.Argument(..., help="models:/NAME@ALIAS or models:/NAME/VERSION."),
             data: Optional[str] = typer.Option(None, "--data", help="Held-out JSONL file (alpaca, chat or text "
                                                "records; default: the version's own eval data)."),
             against: Optional[str] = typer.Option(None, "--against", help="Another version to evaluate on the "
                                                   "same examples, side by side (models:/NAME@ALIAS)."),
             as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
             max_examples: Optional[int] = typer.Option(None, "--max-examples", min=1,
                                                        help="Evaluate the first N examples only."),
             max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=0, help="Tokens to generate per example."),
             tracking_uri: str = typer.Option("sqlite:///mlflow.db", "--tracking-uri",
                                              help="MLflow tracking/registry URI.")):
    """Loss, perplexity, exact match, ROUGE-L, chrF and BLEU of a registered version on held-out
    data; with --against, two versions on the same examples. Logged as an MLflow evaluation run
    and onto the versions' tags (`eval.<metric>`, `eval.run_id`)."""
    from orchestrator.evaluation.evaluate import evaluate_versions
    from orchestrator.tracking.runs import resolve_tracking_uri

    _quiet_transformers()
    refs = [model] + ([against] if against else [])
    evaluation = _evaluation_call(evaluate_versions, resolve_tracking_uri(tracking_uri), refs, data_file=data,
                                  max_examples=max_examples, max_new_tokens=max_new_tokens)
    if as_json:
        typer.echo(json.dumps(evaluation.to_json(), indent=2))
        return
    Console().print(metrics_table(evaluation, f"{len(evaluation.prompts)} examples of {evaluation.data} "
                                              f"({evaluation.format})"))
    if len(evaluation.results) == 2 and evaluation.results[0].scores:
        a, b = (r.scores for r in evaluation.results)
        better = sum(x["rougeL"] > y["rougeL"] for x, y in zip(a, b))
        worse = sum(x["rougeL"] < y["rougeL"] for x, y in zip(a, b))
        err.print(f"per example (ROUGE-L): {better} better, {worse} worse, {len(a) - better - worse} equal",
                  highlight=False)
    err.print(f"[green]ok[/] logged as MLflow run {evaluation.run_id}", highlight=False)
