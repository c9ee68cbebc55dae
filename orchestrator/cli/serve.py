"""`orchestrator serve`: registered adapters of one base behind an OpenAI-compatible API on Ray
Serve; `--reload` tells a running server to re-resolve its aliases."""

from __future__ import annotations

from typing import List, Optional

import typer

from orchestrator.cli.common import _quiet_transformers, _stdout_for_results_only, app, err
from orchestrator.serving.deployment import MAX_BATCH


@app.command()
def serve(models: Optional[List[str]] = typer.Argument(None, help="models:/NAME@ALIAS or models:/NAME/VERSION "
                                                       "(several: adapters of one base, and merged or full "
                                                       "versions, served by one deployment)."),
          address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: start a "
                                                                        "local Ray)."),
          host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0: every one)."),
          port: int = typer.Option(8000, "--port", help="HTTP port."),
          replicas: int = typer.Option(1, "--replicas", min=1, help="Replicas of the deployment (each loads "
                                                                     "the base once per PEFT method and "
                                                                     "quantization, and each merged version)."),
          reload_every: Optional[float] = typer.Option(None, "--reload-every", min=1.0,
                                                       help="Re-resolve the aliases every S seconds (every replica)."),
          max_batch: int = typer.Option(MAX_BATCH, "--max-batch", min=1,
                                        help="Requests a replica completes together at most (1: each alone, "
                                             "answers exactly `generate`'s)."),
          reload: bool = typer.Option(False, "--reload", help="Do not start a server: tell the one on --host/--port "
                                                              "to re-resolve its aliases now."),
          tracking_uri: str = typer.Option("sqlite:///mlflow.db", "--tracking-uri",
                                           help="MLflow tracking/registry URI.")):
    """Serve registered versions over an OpenAI-compatible HTTP API (/v1/completions,
    /v1/chat/completions, /v1/models) on Ray Serve; the request's `model` is the reference it was
    served as. Greedy unless a request sets a temperature, formatted as `orchestrator generate`
    formats prompts; streamed on request; requests that arrive together completed in one batch.
    Runs until Ctrl-C."""
    from orchestrator.serving import deployment

    if reload:
        import urllib.error

        try:
            moved = deployment.reload(f"http://{host}:{port}")
        except (urllib.error.URLError, OSError) as e:
            err.print(f"[bold red]error:[/] --port: no server answers on http://{host}:{port} ({e}). Fix: start one "
                      "with `orchestrator serve MODEL`, or pass its --host and --port", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2)
        for ref, version in moved.items():
            typer.echo(f"{ref} -> {version}")
        return
    if not models:
        err.print("[bold red]error:[/] MODELS: none given. Fix: pass one or more models:/NAME@ALIAS", highlight=False)
        raise typer.Exit(code=2)
    _serve(models, address, host, port, replicas, reload_every, tracking_uri, max_batch)


def _serve(models, address, host, port, replicas, reload_every, tracking_uri, max_batch) -> None:
    import signal
    import time

    from orchestrator.serving import deployment
    from orchestrator.tracking.registry import lookup_errors, resolve_version
    from orchestrator.tracking.runs import resolve_tracking_uri
    from orchestrator.training.launch import connect, shutdown

    _quiet_transformers()
    uri = resolve_tracking_uri(tracking_uri)
    for ref in models:  # unknown names and aliases are found here, before Ray starts
        try:
            resolve_version(uri, ref)
        except lookup_errors() as e:
            err.print("[bold red]error:[/] ", end="")
            err.print(f"{ref}: {str(getattr(e, 'message', e)).splitlines()[0].rstrip('.')}. Fix: name a registered "
                      "version (`orchestrator registry list`)", highlight=False, markup=False, soft_wrap=True)
            raise typer.Exit(code=2)
    # Ctrl-C, `kill` (SIGTERM), and SIGINT to a server started in the background (a shell's `&`
    # ignores SIGINT in it) all end in the teardown below, which frees Serve's and Ray's processes.
    # Set again once Ray is up: ray.init installs its own SIGTERM handler, which aborts the process.
    def on_signals():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)

    on_signals()
    with _stdout_for_results_only():
        try:
            connect(address)
            on_signals()
            err.print(f"[dim]•[/] Deploying {', '.join(models)} ({replicas} replica(s))", highlight=False)
            url = deployment.start(models, uri, host=host, port=port, replicas=replicas, reload_every=reload_every,
                                   max_batch=max_batch)
            err.print(f"[green]ok[/] serving on {url}/v1 (models: {', '.join(models)}); Ctrl-C stops", highlight=False)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            deployment.stop()
            shutdown()
