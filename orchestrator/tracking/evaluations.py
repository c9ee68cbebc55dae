"""Evaluation records in MLflow: an evaluation run (metrics per version, the examples as a table)
in the evaluated model's experiment, the versions' `eval.*` tags, and generation tables."""

from __future__ import annotations

from orchestrator.tracking.runs import _client, _quiet

EVAL_TABLE = "evaluation.json"
GENERATIONS_TABLE = "generations.json"


def _table(rows: list[dict]) -> dict[str, list]:
    """Rows as MLflow's column-oriented table (every column present in every row)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return {c: [row.get(c, "") for row in rows] for c in columns}


def log_evaluation(uri: str, model_run_id: str | None, *, run_name: str,
                   models: list[tuple[str, str, dict[str, float]]], rows: list[dict], tags: dict[str, str]) -> str:
    """A finished run holding one evaluation: the first model's metrics under their names, every
    other model's as `against.<metric>` (the first version's experiment; tags name the versions),
    the examples as a table; each version gets `eval.<metric>` and `eval.run_id` tags. Returns
    the run id."""
    from mlflow.entities import Metric, RunTag

    client = _client(uri)
    experiment_id = client.get_run(model_run_id).info.experiment_id if model_run_id else "0"
    version_tags = {f"eval.version.{i}": f"models:/{name}/{version}" for i, (name, version, _) in enumerate(models)}
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={"orchestrator.kind": "evaluation", **version_tags, **tags})
    run_id = run.info.run_id
    logged = []
    for i, (_, _, values) in enumerate(models):
        prefix = "" if i == 0 else "against."
        logged += [Metric(prefix + k, float(v), 0, 0) for k, v in values.items()]
    client.log_batch(run_id, metrics=logged, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    with _quiet():
        client.log_table(run_id, _table(rows), EVAL_TABLE)
    client.set_terminated(run_id)
    for name, version, values in models:
        for k, v in {**{f"eval.{m}": f"{x:.6g}" for m, x in values.items()}, "eval.run_id": run_id,
                     "eval.data": tags.get("eval.data", "")}.items():
            client.set_model_version_tag(name, version, k, v)
    return run_id


def log_generations(uri: str, run_id: str, rows: list[dict]) -> None:
    """Append rows (step, prompt, reference, output) to the run's generations table."""
    with _quiet():
        _client(uri).log_table(run_id, _table(rows), GENERATIONS_TABLE)


def read_table(uri: str, run_id: str, artifact_file: str) -> list[dict]:
    """A table a run logged, as rows."""
    import json
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(_client(uri).download_artifacts(run_id, artifact_file, tmp))
        table = json.loads(path.read_text(encoding="utf-8"))
    return [dict(zip(table["columns"], row)) for row in table["data"]]
