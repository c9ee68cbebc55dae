"""Everything that talks to MLflow: runs, params, metrics, artifacts, and the model registry.

The driver opens the run (`start_run`), rank 0 of the workers streams per-step metrics into it
(`MetricLogger`), and the driver closes it and registers the result (`register_adapter`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.spec import JobSpec, flatten

ADAPTER_ARTIFACT = "adapter"
SPEC_FILE = "job.yaml"


def resolve_tracking_uri(uri: str, cwd: Path | None = None) -> str:
    """Make a relative sqlite URI absolute, so workers (whose working directory differs) and a
    later `mlflow ui` find the same database file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = (cwd or Path.cwd()) / uri[len(prefix):]
        return prefix + str(path.resolve())
    return uri


def _artifact_root(uri: str) -> str | None:
    """For a sqlite store, keep artifacts in `mlartifacts/` beside the database file."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).parent / "mlartifacts")
    return None


@contextlib.contextmanager
def _quiet():
    """Silence MLflow's console chatter (progress bars, notices) around a call; errors still raise."""
    import logging
    import warnings

    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _client(uri: str):
    import mlflow
    from mlflow import MlflowClient

    # No tqdm bars for artifact transfers in our console output.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import logging

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating tables..."
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ui_command(uri: str) -> str:
    if uri.startswith("sqlite:///"):
        return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    return f"open {uri}"


@dataclass
class RunHandle:
    uri: str
    run_id: str
    experiment: str
    experiment_id: str


def start_run(spec: JobSpec, *, tags: dict[str, str], artifacts: dict[str, Any]) -> RunHandle:
    """Create the run: flattened spec as params, tags, and text/JSON artifacts."""
    from mlflow.entities import Param, RunTag

    uri = resolve_tracking_uri(spec.tracking.uri)
    client = _client(uri)
    name = spec.experiment
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        root = _artifact_root(uri)
        exp_id = client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)
    else:
        exp_id = experiment.experiment_id
    run = client.create_run(exp_id, run_name=spec.name, tags={"spec_hash": spec.spec_hash(),
                                                               "base_model": spec.model.base, **tags})
    run_id = run.info.run_id
    params = [Param(k, str(v)[:6000]) for k, v in flatten(spec.model_dump(mode="json")).items()]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
        client.log_batch(run_id, params=params[i:i + 100])
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    client.log_text(run_id, spec.to_yaml(), SPEC_FILE)
    for path, content in artifacts.items():
        if isinstance(content, (dict, list)):
            client.log_dict(run_id, content, path)
        else:
            client.log_text(run_id, str(content), path)
    return RunHandle(uri=uri, run_id=run_id, experiment=name, experiment_id=exp_id)


def log_metrics(handle: RunHandle, metrics: dict[str, float], step: int | None = None) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    _client(handle.uri).log_batch(handle.run_id, metrics=[
        Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None])


def set_tags(handle: RunHandle, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    _client(handle.uri).log_batch(handle.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def finish_run(handle: RunHandle, status: str = "FINISHED") -> None:
    _client(handle.uri).set_terminated(handle.run_id, status=status)


class MetricLogger:
    """Buffered per-step metrics from rank 0 into an existing run.

    Metrics are sent in batches (at evaluation steps and at the end) rather than one request
    per step; a failed send keeps the buffer, so the next flush retries it.
    """

    def __init__(self, uri: str, run_id: str, flush_every: int = 25):
        self.uri, self.run_id, self.flush_every = uri, run_id, flush_every
        self._buffer: list = []

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self._buffer) >= self.flush_every * 4:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        client = _client(self.uri)
        while self._buffer:
            chunk = self._buffer[:1000]  # MLflow takes at most 1000 metrics a batch
            client.log_batch(self.run_id, metrics=chunk)
            del self._buffer[:len(chunk)]


# --- registry ------------------------------------------------------------------------------------


def _adapter_pyfunc():
    import mlflow.pyfunc

    class AdapterModel(mlflow.pyfunc.PythonModel):
        """A registered adapter as an MLflow pyfunc: `predict(list of prompts) -> completions`.

        The base model is not stored; it is resolved from the job spec saved with the adapter.
        """

        def load_context(self, context):
            from orchestrator.inference import load_adapter

            self.loaded = load_adapter(context.artifacts[ADAPTER_ARTIFACT])

        def predict(self, context, model_input, params=None):
            from orchestrator.inference import complete

            prompts = model_input if isinstance(model_input, list) else list(model_input.iloc[:, 0])
            max_new = int((params or {}).get("max_new_tokens", 64))
            return [complete(self.loaded, str(p), max_new_tokens=max_new) for p in prompts]

    return AdapterModel()


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "transformers", "peft", "bitsandbytes", "mlflow",
                                             "pydantic", "pyyaml", "safetensors")]


def _mode(spec: JobSpec) -> str:
    """What a registered version holds: an adapter over a referenced base, or a whole model."""
    return "full-model" if spec.peft.method == "full" else spec.registry.mode


@dataclass
class RegisteredVersion:
    name: str
    version: str
    alias: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"


def register_adapter(handle: RunHandle, spec: JobSpec, adapter_dir: str | Path,
                     tags: dict[str, str]) -> RegisteredVersion:
    """Log the adapter (weights, config, job spec; not the base) as a pyfunc model of the run,
    register it as a new version of `registry.name`, and point `registry.alias` at it."""
    import mlflow

    import orchestrator

    client = _client(handle.uri)
    adapter_dir = Path(adapter_dir)
    (adapter_dir / SPEC_FILE).write_text(spec.to_yaml(), encoding="utf-8")
    name = spec.registered_name
    with _quiet(), mlflow.start_run(run_id=handle.run_id):
        info = mlflow.pyfunc.log_model(
            name=ADAPTER_ARTIFACT, python_model=_adapter_pyfunc(),
            artifacts={ADAPTER_ARTIFACT: str(adapter_dir)},
            code_paths=[str(Path(orchestrator.__file__).parent)],
            pip_requirements=_pip_requirements())
        version = mlflow.register_model(info.model_uri, name, tags={"mode": _mode(spec),
                                                                     "run_id": handle.run_id, **tags})
    client.set_registered_model_alias(name, spec.registry.alias, version.version)
    return RegisteredVersion(name=name, version=str(version.version), alias=spec.registry.alias)


def download_model(model_uri: str, dst: str | Path, tracking_uri: str | None = None) -> Path:
    """Fetch a registered model (`models:/NAME@ALIAS` or `models:/NAME/VERSION`) and return the
    directory holding its adapter."""
    import mlflow

    _client(resolve_tracking_uri(tracking_uri or "sqlite:///mlflow.db"))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    adapter = local / "artifacts" / ADAPTER_ARTIFACT
    return adapter if adapter.is_dir() else local


def run_metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric of a run, by step."""
    client = _client(uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
