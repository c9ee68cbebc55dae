"""A real search: Ray Tune driving one Ray Train TorchTrainer per trial (DeepSpeed, 4-bit base)
on the CPU, tracked in MLflow (a parent run with nested trial runs) with the best trial's
adapter registered; and a search resumed after its driver was killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from orchestrator.spec import load_spec

from conftest import REPO, adapter_copies, bucket_keys, local_s3

SPACE = "{peft.r: {choice: [4, 8]}, training.learning_rate: {choice: [1.0e-5, 3.0e-3]}}"


def search_sets(tmp, name: str, **extra) -> list[str]:
    sets = {"name": name, "tracking.uri": f"sqlite:///{tmp}/mlflow.db", "tracking.experiment": name,
            "registry.name": name, "storage.path": str(tmp / "runs"), "training.max_steps": 4,
            "training.eval_every": 1, "distributed.num_workers": 1,
            "tune": "{num_samples: 4, max_concurrent_trials: 2, search_alg: random, seed: 3, "
                    f"scheduler: {{type: asha, grace_period: 1, reduction_factor: 2}}, space: {SPACE}}}",
            **extra}
    return [f"{k}={v}" for k, v in sets.items()]


def client(tmp):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp}/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def runs_of(c, experiment: str):
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], max_results=100)


@pytest.fixture(scope="module")
def searched(tmp_path_factory, ray_local, tiny_base):
    from orchestrator.search.recipe import run_spec as run_job  # a tune spec: the search dispatch

    tmp = tmp_path_factory.mktemp("search")
    spec = load_spec(REPO / "jobs" / "quickstart.yaml", search_sets(tmp, "search-e2e"))
    return tmp, spec, run_job(spec)


def test_search_tracks_a_parent_with_nested_trials_and_registers_only_the_best(searched):
    tmp, spec, summary = searched
    c = client(tmp)
    runs = runs_of(c, "search-e2e")
    parents = [r for r in runs if r.data.tags.get("search") == "parent"]
    children = [r for r in runs if r.data.tags.get("search") == "trial"]
    assert [p.info.run_id for p in parents] == [summary.run_id]
    assert parents[0].info.status == "FINISHED"
    assert len(children) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {summary.run_id}
    assert len({r.data.tags["tune_trial_id"] for r in children}) == 4

    by_trial = {t["trial_id"]: t for t in summary.trials}
    for r in children:
        trial = by_trial[r.data.tags["tune_trial_id"]]
        steps = sorted(m.step for m in c.get_metric_history(r.info.run_id, "eval_loss"))
        # Completed: evaluated at every step to the end; stopped early (KILLED): fewer.
        expected = {"completed": "FINISHED", "stopped early": "KILLED", "failed": "FAILED"}[trial["state"]]
        assert r.info.status == expected, (trial, r.info.status)
        assert (steps == [0, 1, 2, 3, 4]) == (trial["state"] == "completed"), (trial, steps)
        searched_values = json.loads(r.data.tags["searched"])
        assert r.data.params["peft.r"] == str(searched_values["peft.r"]) == str(trial["params"]["peft.r"])
        # Each trial's own memory plan: on its run (tag and step-0 metric) and in the trials table.
        assert int(r.data.tags["planned_peak_bytes"]) == trial["planned_peak_bytes"] == \
            r.data.metrics["planned_gpu_bytes"]
    peaks = {r: {t["planned_peak_bytes"] for t in summary.trials if t["params"]["peft.r"] == r} for r in (4, 8)}
    assert max(peaks[4]) < min(peaks[8]), peaks  # a larger rank plans more memory

    versions = c.search_model_versions("name='search-e2e'")
    assert len(versions) == 1
    best = summary.trials[0]
    assert best["state"] == "completed"
    assert versions[0].run_id == best["run_id"] == parents[0].data.tags["best_run_id"]
    assert versions[0].tags["tune_trial_id"] == best["trial_id"]
    assert versions[0].tags["search_run_id"] == summary.run_id
    assert c.get_model_version_by_alias("search-e2e", "candidate").version == versions[0].version
    completed = [t["metric"] for t in summary.trials if t["state"] == "completed"]
    assert best["metric"] == min(completed) == pytest.approx(summary.metrics["eval_loss"], abs=1e-4)


def test_search_parent_holds_space_best_params_table_and_plots(searched):
    tmp, spec, summary = searched
    c = client(tmp)
    parent = c.get_run(summary.run_id)
    assert parent.data.params["best.peft.r"] == str(summary.trials[0]["params"]["peft.r"])
    assert parent.data.metrics["best_eval_loss"] == pytest.approx(summary.metrics["eval_loss"], rel=1e-3)
    paths = {a.path for a in c.list_artifacts(summary.run_id)} | \
        {a.path for a in c.list_artifacts(summary.run_id, "plots")}
    assert {"trials.csv", "search_space.json", "job.yaml", "plots/curves.png",
            "plots/metric_vs_peft.r.png", "plots/metric_vs_training.learning_rate.png"} <= paths
    table = open(c.download_artifacts(summary.run_id, "trials.csv")).read().splitlines()
    assert len(table) == 5 and table[1].split(",")[1] == summary.trials[0]["trial_id"]
    png = c.download_artifacts(summary.run_id, "plots/curves.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def _cli(tmp, sets, log, env):
    cmd = [sys.executable, "-m", "orchestrator", "run", str(REPO / "jobs" / "quickstart.yaml"), "--json"]
    for s in sets:
        cmd += ["--set", s]
    # Its own session: the test stops the driver and the local Ray it started as one group.
    return subprocess.Popen(cmd, cwd=tmp, env={**os.environ, "PYTHONPATH": str(REPO), **env},
                            stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)


def _stop(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


BUCKET = "search-runs"


def _finished_a_trial(bucket) -> bool:
    """Tune's saved state (in the bucket) holds a finished trial."""
    return any("TERMINATED" in bucket.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
               for key in bucket_keys(bucket, BUCKET)
               if key.startswith("runs/search-resume-search-") and "/experiment_state-" in key)


def test_search_resumes_after_the_driver_is_killed_without_rerunning_finished_trials(tmp_path, tiny_base):
    """Tune's state and the trials' checkpoints in an S3 bucket (a real S3 server, moto's, on
    127.0.0.1): the search restarted after its driver was killed re-runs no finished trial and
    registers the best trial's adapter, fetched from the bucket, leaving no copy in TMPDIR."""
    from orchestrator.tracking.registry import download_model

    sets = search_sets(tmp_path, "search-resume", **{
        "tune.num_samples": 2, "tune.max_concurrent_trials": 1, "tune.scheduler.type": "none",
        "training.max_steps": 2, "storage.path": f"s3://{BUCKET}/runs"})
    log = open(tmp_path / "driver.log", "w")
    # The drivers' own TMPDIR (Ray's sessions go there too: short, for its unix sockets).
    with local_s3(BUCKET, "AKIAFAKESEARCHTEST", "fakeSearchSecret") as (s3_env, bucket), \
            tempfile.TemporaryDirectory(prefix="srch-", dir="/tmp", ignore_cleanup_errors=True) as tmpdir:
        temp = Path(tmpdir)
        env = {**s3_env, "TMPDIR": str(temp)}
        proc = _cli(tmp_path, sets, log, env)
        try:
            # Wait until Tune's saved state holds one finished trial, then kill the driver.
            deadline = time.time() + 600
            while time.time() < deadline and proc.poll() is None and not _finished_a_trial(bucket):
                time.sleep(1)
            assert proc.poll() is None, open(tmp_path / "driver.log").read()[-3000:]
        finally:
            _stop(proc)
        c = client(tmp_path)
        before = {r.data.tags["tune_trial_id"]: r for r in runs_of(c, "search-resume")
                  if r.data.tags.get("search") == "trial" and r.info.status == "FINISHED"}
        assert len(before) >= 1

        proc = _cli(tmp_path, sets, log, env)
        try:
            out, _ = proc.communicate(timeout=900)
        finally:
            _stop(proc)
        assert proc.returncode == 0, open(tmp_path / "driver.log").read()[-3000:]
        keys = bucket_keys(bucket, BUCKET)
        left = adapter_copies(temp)
    summary = json.loads(out)
    runs = runs_of(c, "search-resume")
    parents = [r for r in runs if r.data.tags.get("search") == "parent"]
    assert [p.info.run_id for p in parents] == [summary["run_id"]]  # the same search, resumed
    assert len(summary["trials"]) == 2 and {t["state"] for t in summary["trials"]} == {"completed"}
    trial_runs = [r for r in runs if r.data.tags.get("search") == "trial"]
    for trial_id, run in before.items():  # finished before the kill: not run again
        again = [r for r in trial_runs if r.data.tags["tune_trial_id"] == trial_id]
        assert [r.info.run_id for r in again] == [run.info.run_id]
    # A trial the kill interrupted re-ran in a new child run; its old one is marked.
    for r in trial_runs:
        assert r.info.status == "FINISHED" or r.data.tags.get("interrupted") == "true", r.data.tags
    assert len(c.search_model_versions("name='search-resume'")) == 1
    # Every trial checkpointed into the bucket; the registered version holds the best one's adapter.
    best = parents[0].data.tags["best_trial"]
    assert {t["trial_id"] for t in summary["trials"]} == \
        {k.split("/trainers/")[1].split("/")[0] for k in keys if "/trainers/" in k and k.endswith("/adapter_config.json")}
    registered = download_model("models:/search-resume/1", tmp_path / "v1", f"sqlite:///{tmp_path}/mlflow.db")
    assert (registered / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads((registered / "adapter_config.json").read_text())["r"] == \
        next(t for t in summary["trials"] if t["trial_id"] == best)["params"]["peft.r"]
    assert not left, left
