"""`orchestrator generate`: complete a prompt with a registered (or local) adapter and its base."""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer

from orchestrator.cli.common import _quiet_transformers, app, err


@app.command()
def generate(model: str = typer.Argument(..., help="models:/NAME@ALIAS, models:/NAME/VERSION, or an adapter directory."),
             prompt: str = typer.Argument(..., help="The prompt (for alpaca-format adapters: instruction, "
                                                    "then optionally a newline and the input)."),
             max_new_tokens: int = typer.Option(64, help="Tokens to generate."),
             tracking_uri: str = typer.Option("sqlite:///mlflow.db", help="MLflow tracking URI for models:/ URIs."),
             base: bool = typer.Option(False, "--base", help="Answer with the bare base model, for comparison.")):
    """Complete a prompt with a registered (or local) adapter and its base model."""
    from orchestrator.models.inference import complete, load_adapter

    _quiet_transformers()

    with tempfile.TemporaryDirectory() as tmp:
        if model.startswith("models:/"):
            from orchestrator.tracking.registry import download_model

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
