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

from orchestrator.spec import SPEC_FILE, JobSpec, flatten, redact_uri

ADAPTER_ARTIFACT = "adapter"


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
    # Nor MLflow's "View run ... at: URL" notice when a run ends: its URL is `tracking.uri` as
    # given, user:password@ included.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
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


def _experiment_id(client, uri: str, name: str) -> str:
    """The id of the experiment `name`, created (artifacts beside a sqlite store) if missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    root = _artifact_root(uri)
    return client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)


def start_run(spec: JobSpec, *, tags: dict[str, str], artifacts: dict[str, Any], parent_run_id: str | None = None,
              run_name: str | None = None) -> RunHandle:
    """Create the run: flattened spec as params, tags, and text/JSON artifacts; with
    `parent_run_id`, a child run nested under that one (a trial under its search)."""
    from mlflow.entities import Param, RunTag

    uri = resolve_tracking_uri(spec.tracking.uri)
    client = _client(uri)
    name = spec.experiment
    exp_id = _experiment_id(client, uri, name)
    run = client.create_run(exp_id, run_name=run_name or spec.name, tags={
        "spec_hash": spec.spec_hash(), "base_model": spec.model.base, **parent_tags(parent_run_id), **tags})
    run_id = run.info.run_id
    params = [Param(k, str(v)[:6000]) for k, v in flatten(spec.public_dict()).items()]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
        client.log_batch(run_id, params=params[i:i + 100])
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    handle = RunHandle(uri=uri, run_id=run_id, experiment=name, experiment_id=exp_id)
    log_artifacts(handle, {SPEC_FILE: spec.to_yaml(), **artifacts})
    return handle


def open_store(uri: str) -> None:
    """Import MLflow and open the tracking store once (for a new sqlite file this creates its
    tables, about 2 s), so that later calls find it ready. Never raises: the first real call
    reports any problem with the store."""
    with contextlib.suppress(Exception):
        _client(resolve_tracking_uri(uri)).search_experiments(max_results=1)


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise `SpecError` (tracking.uri) when an MLflow server URI does not answer within
    `timeout_s`, so that a typo or a stopped server costs seconds, before any worker starts.
    Database and file stores are opened by MLflow itself."""
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    from orchestrator.spec import Problem, SpecError

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    # /health answers without credentials; the URI's own path prefix is kept (a proxied server).
    url = f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path.rstrip('/')}/health"
    try:
        urllib.request.urlopen(url, timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # it answered (a proxy may not know /health): reachable
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise SpecError([Problem(path="tracking.uri",
                                 message=f"cannot reach the MLflow server at {url.removesuffix('/health')} "
                                         f"({reason})",
                                 fix="start it (e.g. infra/mlflow, or `mlflow server --host 127.0.0.1 --port "
                                     "5000`), fix the address, or use sqlite:///mlflow.db")]) from None


def wait_for_server(uri: str, timeout_s: float, interval_s: float = 2.0) -> bool:
    """True once the tracking server answers (at once for database and file stores); False
    when it has not within `timeout_s`."""
    from orchestrator.spec import SpecError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            check_reachable(uri)
            return True
        except SpecError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval_s)


# Runs a second `orchestrator run` of the same job picks up again: stopped before they finished.
RESUMABLE_STATUSES = ("RUNNING", "FAILED", "KILLED")


def resumable_run(spec: JobSpec) -> RunHandle | None:
    """The job's latest MLflow run (same name, same spec hash) when it stopped unfinished, else
    None: a finished latest run means the job is done and a new run starts."""
    uri = resolve_tracking_uri(spec.tracking.uri)
    client = _client(uri)
    experiment = client.get_experiment_by_name(spec.experiment)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"attributes.run_name = '{spec.name}' and "
                                            f"tags.spec_hash = '{spec.spec_hash()}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs or runs[0].info.status not in RESUMABLE_STATUSES:
        return None
    return RunHandle(uri=uri, run_id=runs[0].info.run_id, experiment=spec.experiment,
                     experiment_id=experiment.experiment_id)


def stopped_run_spec(uri: str, name: str) -> tuple[str, JobSpec]:
    """The run id and job spec of the latest run named `name` that stopped unfinished, for
    `orchestrator resume`. Raises LookupError when there is none."""
    from orchestrator.spec import parse_spec

    import yaml

    client = _client(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"attributes.run_name = '{name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs or runs[0].info.status not in RESUMABLE_STATUSES:
        state = f"its latest run {runs[0].info.run_id} is {runs[0].info.status}" if runs else "there is no run"
        raise LookupError(f"no stopped run of job '{name}' in {uri} to resume ({state})")
    run_id = runs[0].info.run_id
    text = Path(client.download_artifacts(run_id, SPEC_FILE)).read_text(encoding="utf-8")
    return run_id, parse_spec(yaml.safe_load(text), source=f"{SPEC_FILE} of run {run_id}")


def reopen_run(handle: RunHandle) -> None:
    """Mark a stopped run as running again (it is being resumed)."""
    _client(handle.uri).update_run(handle.run_id, status="RUNNING")


def start_parent_run(spec: JobSpec, *, name: str, tags: dict[str, str]) -> RunHandle:
    """A run that holds other runs (`orchestrator compare`: one child per method); it carries the
    shared job spec as an artifact, and the children carry their own params."""
    uri = resolve_tracking_uri(spec.tracking.uri)
    client = _client(uri)
    exp_id = _experiment_id(client, uri, spec.experiment)
    run = client.create_run(exp_id, run_name=name, tags={"base_model": spec.model.base, **tags})
    client.log_text(run.info.run_id, spec.to_yaml(), SPEC_FILE)
    return RunHandle(uri=uri, run_id=run.info.run_id, experiment=spec.experiment, experiment_id=exp_id)


def log_files(handle: RunHandle, paths: list[Path]) -> None:
    """Upload local files as artifacts at the root of the run."""
    client = _client(handle.uri)
    for path in paths:
        client.log_artifact(handle.run_id, str(path))


def parent_tags(parent_run_id: str | None) -> dict[str, str]:
    """The tag that nests a run under another in the MLflow UI (none for a top-level run)."""
    return {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}


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


# A worker's MLflow calls fail fast when the server is down (MLflow's own default retries for
# minutes); the logger keeps what it could not send and tries again at its next flush.
_WORKER_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def log_params(handle: RunHandle, params: dict[str, Any]) -> None:
    """Params not logged yet (MLflow refuses to change a logged param)."""
    from mlflow.entities import Param

    logged = _client(handle.uri).get_run(handle.run_id).data.params
    new = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in params.items()
           if k not in logged]
    if new:
        _client(handle.uri).log_batch(handle.run_id, params=new)


def log_artifacts(handle: RunHandle, artifacts: dict[str, Any]) -> None:
    """Text, JSON (dicts and lists) and matplotlib figures (logged as PNG) under their paths."""
    client = _client(handle.uri)
    for path, content in artifacts.items():
        if hasattr(content, "savefig"):
            with _quiet():
                client.log_figure(handle.run_id, content, path)
        elif isinstance(content, (dict, list)):
            client.log_dict(handle.run_id, content, path)
        else:
            client.log_text(handle.run_id, str(content), path)


def find_runs(uri: str, experiment: str, tags: dict[str, str]) -> list[tuple[RunHandle, str, dict]]:
    """Runs of `experiment` carrying all of `tags`, newest first: (handle, status, tags)."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([exp.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"],
                              max_results=1000)
    return [(RunHandle(uri=uri, run_id=r.info.run_id, experiment=experiment, experiment_id=exp.experiment_id),
             r.info.status, dict(r.data.tags)) for r in runs]


def find_runs_anywhere(uri: str, tags: dict[str, str]) -> list[tuple[RunHandle, str, dict]]:
    """Runs of any experiment carrying all of `tags`, newest first."""
    client = _client(uri)
    out = []
    for exp in client.search_experiments():
        out += find_runs(uri, exp.name, tags)
    return sorted(out, key=lambda r: client.get_run(r[0].run_id).info.start_time, reverse=True)


def read_run_text(handle: RunHandle, path: str) -> str:
    return Path(_client(handle.uri).download_artifacts(handle.run_id, path)).read_text(encoding="utf-8")


class MetricLogger:
    """Buffered per-step metrics from rank 0 into an existing run.

    Metrics are sent in batches (at evaluation and checkpoint steps, every `flush_interval_s`
    seconds, and at the end) rather than one request per step: each send is a database write or
    an HTTP request on the training thread. A failed send keeps the buffer, so the next flush
    retries it: an unreachable server never stops training. A step the run already has for a
    metric (logged before a worker failure or a driver restart) is not sent again, so each step
    appears once.
    """

    def __init__(self, uri: str, run_id: str, flush_interval_s: float = 10.0, fail_fast: bool = True):
        self.uri, self.run_id, self.flush_interval_s = uri, run_id, flush_interval_s
        self._last_flush = time.monotonic()
        self._buffer: list = []
        self._logged: dict[str, set[int]] = {}  # metric -> steps the run has, fetched once per metric
        self.last_error: Exception | None = None
        if fail_fast:  # in a worker process, whose only MLflow calls are these
            for k, v in _WORKER_HTTP_ENV.items():
                os.environ.setdefault(k, v)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        if time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def extend(self, pending: list[dict]) -> None:
        """Add metrics that another process could not send (`close()`'s return value)."""
        from mlflow.entities import Metric

        self._buffer += [Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in pending]

    def flush(self) -> bool:
        """Send what is buffered; True when nothing is left. Never raises: a failure is kept in
        `last_error` and the metrics stay buffered."""
        self._last_flush = time.monotonic()
        if not self._buffer:
            return True
        try:
            client = _client(self.uri)
            for key in {m.key for m in self._buffer} - self._logged.keys():
                self._logged[key] = {m.step for m in client.get_metric_history(self.run_id, key)}
            self._buffer = [m for m in self._buffer if m.step not in self._logged[m.key]]
            while self._buffer:
                chunk = self._buffer[:1000]  # MLflow takes at most 1000 metrics a batch
                client.log_batch(self.run_id, metrics=chunk)
                for m in chunk:
                    self._logged[m.key].add(m.step)
                del self._buffer[:len(chunk)]
        except Exception as e:  # unreachable, timed out, 5xx: all mean "try again later"
            if self.last_error is None:
                print(f"MLflow at {redact_uri(self.uri)} unreachable ({type(e).__name__}); keeping "
                      f"{len(self._buffer)} metric value(s) to send later", flush=True)
            self.last_error = e
            return False
        self.last_error = None
        return True

    def close(self, timeout_s: float, interval_s: float = 2.0) -> list[dict]:
        """Flush, retrying for up to `timeout_s`; returns what is still unsent (empty when all
        arrived), as plain dicts for `extend`."""
        deadline = time.monotonic() + timeout_s
        while not self.flush() and time.monotonic() < deadline:
            time.sleep(interval_s)
        return [{"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in self._buffer]


# --- registry ------------------------------------------------------------------------------------

MODEL_ARTIFACT = "model"        # the pyfunc artifact holding the adapter or merged model directory
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")  # logged as code: no cloudpickle
EXAMPLE_PROMPT = "Say hello."


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "transformers", "peft", "bitsandbytes", "mlflow",
                                             "pydantic", "pyyaml", "safetensors")]


# What an `adapter` version of a freeze job holds: the trained tensors, over a referenced base.
CHANGED_WEIGHTS = "changed-weights"


def _mode(spec: JobSpec) -> str:
    """What a registered version holds: an adapter over a referenced base (for `freeze`, the
    changed weights over it), or a whole model."""
    if spec.peft.method == "full":
        return "full-model"
    if spec.peft.method == "freeze" and spec.registry.mode == "adapter":
        return CHANGED_WEIGHTS
    return spec.registry.mode


def dir_size(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


@dataclass
class RegisteredVersion:
    name: str
    version: str
    alias: str
    mode: str = "adapter"
    linked: str | None = None  # for registry.mode=both: the other version, as models:/NAME/VERSION

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"


def _log_version(handle: RunHandle, model_dir: Path, *, name: str, alias: str, kind: str,
                 tags: dict[str, str]) -> RegisteredVersion:
    """Log `model_dir` as a pyfunc model of the run, register it as a new version of `name`, and
    point `alias` at it."""
    import mlflow
    from mlflow.models import infer_signature

    import orchestrator

    client = _client(handle.uri)
    # A signature but no input example: MLflow validates an input example by loading the model
    # and predicting once, which for a 7B base means minutes and its whole weight in driver memory.
    signature = infer_signature([EXAMPLE_PROMPT], ["completion"], params={"max_new_tokens": 64})
    with _quiet(), mlflow.start_run(run_id=handle.run_id):
        info = mlflow.pyfunc.log_model(
            name=ADAPTER_ARTIFACT if kind == CHANGED_WEIGHTS else kind, python_model=str(PYFUNC_FILE), artifacts={MODEL_ARTIFACT: str(model_dir)},
            code_paths=[str(Path(orchestrator.__file__).parent)], pip_requirements=_pip_requirements(),
            signature=signature)
        version = mlflow.register_model(info.model_uri, name, tags={
            "mode": kind, "run_id": handle.run_id, "size_bytes": str(dir_size(model_dir)), **tags})
    client.set_registered_model_alias(name, alias, version.version)
    return RegisteredVersion(name=name, version=str(version.version), alias=alias, mode=kind)


def lineage_tags(lineage: dict) -> dict[str, str]:
    """Lineage as flat run/version tags (`data.train_sha256`, ...); unknown values left out."""
    return {k: str(v) for k, v in flatten(lineage).items() if v is not None}


def register_trained(handle: RunHandle, spec: JobSpec, adapter_dir: str | Path, tags: dict[str, str],
                     lineage: dict | None = None, mode: str | None = None) -> RegisteredVersion:
    """Register what a run trained as `mode` (default `registry.mode`): the adapter (weights,
    config, job spec, lineage; not the base), the base with the adapter merged into it (a plain
    transformers model), or both as `NAME` and `NAME-merged`, linked by tags. Returns the
    adapter version for `both`, with the merged one in `linked`."""
    import tempfile

    from orchestrator.inference import LINEAGE_FILE, save_merged

    adapter_dir = Path(adapter_dir)
    (adapter_dir / SPEC_FILE).write_text(spec.to_yaml(), encoding="utf-8")
    if lineage is not None:
        (adapter_dir / LINEAGE_FILE).write_text(dump_json(lineage), encoding="utf-8")
    mode = mode or _mode(spec)
    if spec.peft.method == "full":
        mode = "full-model"
    if spec.peft.method == "freeze" and mode == "adapter":
        mode = CHANGED_WEIGHTS
    tags = {**lineage_tags(lineage or {}), "peft_method": spec.peft.method, **tags}
    name, alias = spec.registered_name, spec.registry.alias
    if mode in ("adapter", "full-model", CHANGED_WEIGHTS):
        return _log_version(handle, adapter_dir, name=name, alias=alias, kind=mode, tags=tags)
    with tempfile.TemporaryDirectory() as tmp:
        merged_dir = save_merged(adapter_dir, Path(tmp) / "merged")
        if mode == "merged":
            return _log_version(handle, merged_dir, name=name, alias=alias, kind="merged", tags=tags)
        kind = CHANGED_WEIGHTS if spec.peft.method == "freeze" else "adapter"
        adapter = _log_version(handle, adapter_dir, name=name, alias=alias, kind=kind, tags=tags)
        merged = _log_version(handle, merged_dir, name=f"{name}-merged", alias=alias, kind="merged",
                              tags={**tags, "adapter_version": f"models:/{name}/{adapter.version}"})
    adapter.linked = f"models:/{merged.name}/{merged.version}"
    _client(handle.uri).set_model_version_tag(name, adapter.version, "merged_version", adapter.linked)
    return adapter


def register_adapter(handle: RunHandle, spec: JobSpec, adapter_dir: str | Path,
                     tags: dict[str, str]) -> RegisteredVersion:
    """The adapter alone (kept for callers that predate `registry.mode`)."""
    return register_trained(handle, spec, adapter_dir, tags, mode="adapter")


def download_model(model_uri: str, dst: str | Path, tracking_uri: str | None = None) -> Path:
    """Fetch a registered model (`models:/NAME@ALIAS` or `models:/NAME/VERSION`) and return the
    directory holding its adapter (or merged model)."""
    import mlflow

    _client(resolve_tracking_uri(tracking_uri or "sqlite:///mlflow.db"))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    # The pyfunc's MLmodel says where its artifact sits (`artifacts/<name of the logged directory>`).
    import yaml

    mlmodel = yaml.safe_load((local / "MLmodel").read_text(encoding="utf-8")) if (local / "MLmodel").is_file() else {}
    artifacts = mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    for key in (MODEL_ARTIFACT, ADAPTER_ARTIFACT):  # `adapter`: versions logged before `model`
        if key in artifacts and (local / artifacts[key]["path"]).is_dir():
            return local / artifacts[key]["path"]
    return local


def run_handle(uri: str, run_id: str) -> RunHandle:
    run = _client(uri).get_run(run_id)
    experiment = _client(uri).get_experiment(run.info.experiment_id)
    return RunHandle(uri=uri, run_id=run_id, experiment=experiment.name, experiment_id=experiment.experiment_id)


def download_run_adapter(uri: str, run_id: str, dst: str | Path) -> Path:
    """The adapter a run logged (its `adapter` logged model), downloaded to `dst`. Raises
    LookupError when the run logged none."""
    client = _client(uri)
    run = client.get_run(run_id)
    for output in (run.outputs.model_outputs if run.outputs else []):
        logged = client.get_logged_model(output.model_id)
        if logged.name == ADAPTER_ARTIFACT:
            return download_model(f"models:/{logged.model_id}", dst, uri)
    raise LookupError(f"run {run_id} logged no adapter (it has {len(run.outputs.model_outputs or [])} "
                      "logged model(s)); register it from a run that finished training")


def parse_model_ref(ref: str) -> tuple[str, str | None, str | None]:
    """`NAME`, `NAME@ALIAS`, `NAME/VERSION` (with or without `models:/`) -> (name, alias, version)."""
    ref = ref.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, alias, None
    if "/" in ref:
        name, version = ref.rsplit("/", 1)
        return name, None, version
    return ref, None, None


def resolve_version(uri: str, ref: str):
    """The MLflow ModelVersion a reference names (the latest version for a bare NAME)."""
    client = _client(uri)
    name, alias, version = parse_model_ref(ref)
    if alias:
        return client.get_model_version_by_alias(name, alias)
    if version:
        return client.get_model_version(name, version)
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        raise LookupError(f"no registered model named '{name}'")
    return max(versions, key=lambda v: int(v.version))


def list_models(uri: str) -> list[dict]:
    """Every registered model: name, latest version (and its mode), aliases -> versions."""
    client = _client(uri)
    out = []
    for m in client.search_registered_models():
        latest = resolve_version(uri, m.name)
        out.append({"name": m.name, "latest_version": str(latest.version), "mode": latest.tags.get("mode", ""),
                    "aliases": {a: str(v) for a, v in sorted((m.aliases or {}).items())}})
    return sorted(out, key=lambda m: m["name"])


def describe_version(uri: str, ref: str) -> dict:
    """Lineage of one version: run, job spec and its hash, data and base hashes, metrics, mode, size."""
    client = _client(uri)
    v = resolve_version(uri, ref)
    model = client.get_registered_model(v.name)
    run = client.get_run(v.run_id) if v.run_id else None
    spec_text = None
    if run:
        with contextlib.suppress(Exception):
            spec_text = Path(client.download_artifacts(v.run_id, SPEC_FILE)).read_text(encoding="utf-8")
    return {
        "name": v.name, "version": str(v.version), "uri": f"models:/{v.name}/{v.version}",
        "aliases": sorted(a for a, ver in (model.aliases or {}).items() if str(ver) == str(v.version)),
        "mode": v.tags.get("mode", ""), "size_bytes": int(v.tags.get("size_bytes", 0) or 0),
        "run_id": v.run_id, "created": v.creation_timestamp, "tags": dict(v.tags),
        "run_status": run.info.status if run else None,
        "metrics": dict(sorted(run.data.metrics.items())) if run else {},
        "run_tags": {k: val for k, val in (run.data.tags if run else {}).items() if not k.startswith("mlflow.")},
        "job_spec": spec_text,
    }


def promote(uri: str, ref: str, alias: str) -> tuple[str, str | None]:
    """Point `alias` at the version `ref` names; returns (new version, version it moved from)."""
    client = _client(uri)
    v = resolve_version(uri, ref)
    previous = (client.get_registered_model(v.name).aliases or {}).get(alias)
    client.set_registered_model_alias(v.name, alias, v.version)
    return str(v.version), (str(previous) if previous is not None else None)


def export_model(uri: str, ref: str, out_dir: str | Path, fmt: str) -> Path:
    """Write a version to `out_dir`: `hf`, a plain transformers model (an adapter version is merged
    into its base first), or `adapter`, the adapter files (an adapter version only)."""
    import shutil
    import tempfile

    from orchestrator.inference import is_merged, save_merged

    v = resolve_version(uri, ref)
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        local = download_model(f"models:/{v.name}/{v.version}", tmp, uri)
        merged = is_merged(local) or v.tags.get("mode") == "full-model"
        if fmt == "adapter" and merged:
            raise ValueError(f"models:/{v.name}/{v.version} is a {v.tags.get('mode', 'merged')} version with no "
                             "adapter to export; use --format hf, or export the adapter version")
        if fmt == "hf" and not merged:
            save_merged(local, out_dir)
        else:
            shutil.copytree(local, out_dir, dirs_exist_ok=True)
    return out_dir


def run_metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric of a run, by step."""
    client = _client(uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
