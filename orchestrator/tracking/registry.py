"""The MLflow model registry: register what a run trained (adapter, merged model or both) as a
pyfunc version (`tracking/pyfunc_model.py`), list, describe, promote, export and download versions."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from orchestrator.spec import SPEC_FILE, JobSpec
from orchestrator.tracking.runs import (ADAPTER_ARTIFACT, RunHandle, _client, _quiet, dump_json, lineage_tags,
                                        resolve_tracking_uri)

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
    from orchestrator.models.inference import PREDICT_PARAMS

    client = _client(handle.uri)
    # A signature but no input example: MLflow validates an input example by loading the model
    # and predicting once, which for a 7B base means minutes and its whole weight in driver memory.
    signature = infer_signature([EXAMPLE_PROMPT], ["completion"], params=PREDICT_PARAMS)
    with _quiet(), mlflow.start_run(run_id=handle.run_id):
        info = mlflow.pyfunc.log_model(
            name=ADAPTER_ARTIFACT if kind == CHANGED_WEIGHTS else kind, python_model=str(PYFUNC_FILE), artifacts={MODEL_ARTIFACT: str(model_dir)},
            code_paths=[str(Path(orchestrator.__file__).parent)], pip_requirements=_pip_requirements(),
            signature=signature)
        version = mlflow.register_model(info.model_uri, name, tags={
            "mode": kind, "run_id": handle.run_id, "size_bytes": str(dir_size(model_dir)), **tags})
    client.set_registered_model_alias(name, alias, version.version)
    return RegisteredVersion(name=name, version=str(version.version), alias=alias, mode=kind)


def register_trained(handle: RunHandle, spec: JobSpec, adapter_dir: str | Path, tags: dict[str, str],
                     lineage: dict | None = None, mode: str | None = None) -> RegisteredVersion:
    """Register what a run trained as `mode` (default `registry.mode`): the adapter (weights,
    config, job spec, lineage; not the base), the base with the adapter merged into it (a plain
    transformers model), or both as `NAME` and `NAME-merged`, linked by tags. Returns the
    adapter version for `both`, with the merged one in `linked`."""
    import tempfile

    from orchestrator.models.inference import LINEAGE_FILE
    from orchestrator.models.merge import save_merged

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


ALIAS_HISTORY_KEEP = 20  # moves kept in the model's `alias_history.<alias>` tag (a tag holds 5,000 chars)


def promote(uri: str, ref: str, alias: str, evidence_run_id: str | None = None) -> tuple[str, str | None]:
    """Point `alias` at the version `ref` names, recording the move (who, when, from which version,
    the evaluation run that justified it) on the version (`promoted.<alias>`) and, with the last
    moves, on the model (`alias_history.<alias>`); returns (new version, version it moved from)."""
    import datetime
    import getpass
    import json

    client = _client(uri)
    v = resolve_version(uri, ref)
    model = client.get_registered_model(v.name)
    previous = (model.aliases or {}).get(alias)
    client.set_registered_model_alias(v.name, alias, v.version)
    try:
        who = getpass.getuser()
    except (KeyError, OSError):  # no user name in a container without a passwd entry
        who = "unknown"
    move = {"alias": alias, "version": str(v.version), "from_version": str(previous) if previous is not None else None,
            "by": who, "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "evidence_run_id": evidence_run_id}
    client.set_model_version_tag(v.name, v.version, f"promoted.{alias}", json.dumps(move))
    history = json.loads((model.tags or {}).get(f"alias_history.{alias}", "[]"))
    client.set_registered_model_tag(v.name, f"alias_history.{alias}",
                                    json.dumps((history + [move])[-ALIAS_HISTORY_KEEP:]))
    return str(v.version), (str(previous) if previous is not None else None)


def alias_version(uri: str, name: str, alias: str) -> str | None:
    """The version `alias` points at, or None when it points nowhere."""
    aliases = _client(uri).get_registered_model(name).aliases or {}
    return str(aliases[alias]) if alias in aliases else None


def export_model(uri: str, ref: str, out_dir: str | Path, fmt: str) -> Path:
    """Write a version to `out_dir`: `hf`, a plain transformers model (an adapter version is merged
    into its base first), or `adapter`, the adapter files (an adapter version only)."""
    import shutil
    import tempfile

    from orchestrator.models.inference import is_merged
    from orchestrator.models.merge import save_merged

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


def lookup_errors() -> tuple[type[BaseException], ...]:
    """What a registry lookup raises for an unknown name, alias or version (a user mistake), so
    that the CLI tells them from bugs without importing MLflow itself."""
    from mlflow.exceptions import MlflowException

    return (MlflowException, LookupError, ValueError)
