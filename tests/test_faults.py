"""Faults a long run must survive: a training worker killed mid-run, the driver stopped mid-run (with
its checkpoints and data in an S3 bucket), the MLflow server going away and coming back.
Real Ray, DeepSpeed, MLflow (a real `mlflow server`), a real S3 server (moto's, on 127.0.0.1);
the faults are real processes killed by pid.

Fake secrets travel with the stopped-and-resumed CLI run (its two attempts): the password of an
MLflow server that requires one (in `tracking.uri`, then in MLFLOW_TRACKING_PASSWORD),
AWS_SECRET_ACCESS_KEY for a local S3 server (moto), the token of a Ray instance started with token
authentication, HF_TOKEN. Everything those runs write (the console, MLflow params, tags, metric names,
artifacts, the MLflow server's log and store, the bucket, Ray's session logs) is
searched for them.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from conftest import REPO, adapter_copies, bucket_keys, free_port, local_s3
from test_end_to_end import quickstart


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def steps(uri: str, run_id: str, key: str) -> list[int]:
    """The step numbers a run holds for `key`, in order, duplicates kept."""
    return sorted(m.step for m in client_for(uri).get_metric_history(run_id, key))


def train_worker_pids() -> list[int]:
    """Ray Train worker processes of this test session's Ray instance (descendants of this process)."""
    return sorted(p.pid for p in psutil.Process().children(recursive=True)
                  if "RayTrainWorker" in " ".join(_cmdline(p)))


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def latest_checkpoint_step(storage: Path) -> int | None:
    from orchestrator.training.launch import latest_checkpoint

    found = [latest_checkpoint(str(storage), d.name) for d in storage.glob("*") if d.is_dir()]
    return max((f[0] for f in found if f), default=None)


# --- the pure part of resuming: the data order continues exactly ---------------------------------------


@pytest.mark.parametrize("start", [0, 1, 3, 4, 7, 11])
def test_micro_batches_resume_exactly_where_they_stopped(start):
    from orchestrator.training.steps import micro_batches

    one_pass = lambda: iter(range(9))  # 9 examples streamed, 2 ranks: rank 1 holds 4 -> 2 batches of 2 per epoch
    for rank in (0, 1):
        for window in (4, 4096):  # shuffled within windows of 4 rows, or all at once
            batches = lambda start=0: micro_batches(one_pass, 9, 2, rank, 2, seed=5, start=start, window=window)
            uninterrupted = list(itertools.islice(batches(), start, start + 6))
            assert list(itertools.islice(batches(start), 6)) == uninterrupted
            # Without the count (a run training while its data is tokenized): the same batches,
            # a resumed run reading its way to where it stopped.
            uncounted = micro_batches(one_pass, None, 2, rank, 2, seed=5, start=start, window=window)
            assert list(itertools.islice(uncounted, 6)) == uninterrupted
    # Each epoch a fresh order; the ranks' batches are disjoint within an epoch.
    epoch = [b for rank in (0, 1) for b in itertools.islice(micro_batches(one_pass, 9, 2, rank, 2, seed=5), 2)]
    assert len({x for b in epoch for x in b}) == 8


@pytest.mark.parametrize("count", [3, None])
def test_too_few_examples_for_a_micro_batch_stop_the_stream(count):
    from orchestrator.data.records import Example
    from orchestrator.training.steps import micro_batches, packed_micro_batches

    too_few = "rank 1 of 2 got too few training examples for one micro batch of 2"
    with pytest.raises(ValueError, match=too_few):
        next(micro_batches(lambda: iter(range(3)), count, 2, 1, 2, seed=5))
    examples = lambda: iter([Example(input_ids=[1, 2, 3], labels=[1, 2, 3])] * 3)  # noqa: E731
    with pytest.raises(ValueError, match=too_few):  # rank 1's one example fills one packed row, not two
        next(packed_micro_batches(examples, 2, 1, 2, seed=5, max_seq_len=8))


def test_rng_states_round_trip():
    import random

    import numpy as np
    import torch

    from orchestrator.training.checkpoint import rng_states, set_rng_states

    saved = rng_states()
    draw = lambda: (random.random(), float(np.random.rand()), float(torch.rand(1)))
    first = draw()
    set_rng_states(saved)
    assert draw() == first


# --- a worker process dies ---------------------------------------------------------------------------


def test_killed_worker_restarts_from_the_last_checkpoint_and_logs_each_step_once(tmp_path, quickstart_run):
    from orchestrator.training.recipe import run_job

    # The session's quickstart run (conftest.py) with checkpoints and a restart allowed: the
    # uninterrupted run this one must equal. Checkpoints change nothing a step computes.
    clean_spec, clean = quickstart_run
    # The kill waits for a checkpoint Ray Train has recorded and for a progress update after it
    # (the driver polls every 0.5 s): 50 steps after the first checkpoint leave several polls on a
    # fast machine (with 30 steps and a checkpoint every 5, a quick run once ended first).
    every, total, evals = 10, clean_spec.training.max_steps, clean_spec.training.eval_every
    assert (total, evals) == (60, 20)
    spec = quickstart(tmp_path, name="fault-worker", **{
        "training.max_steps": total, "training.eval_every": evals, "training.checkpoint_every": every,
        "distributed.max_failures": 1})
    killed: dict = {}

    def on_progress(task, step, _total, _metrics):
        # After a checkpoint Ray Train has recorded, and before the end: kill one worker by pid.
        if task != "training" or killed or step >= total:
            return
        saved = latest_checkpoint_step(tmp_path / "runs")
        if saved is not None and step > saved:
            pid = train_worker_pids()[0]
            os.kill(pid, signal.SIGKILL)
            killed.update(pid=pid, step=step, saved=saved)

    summary = run_job(spec, progress=on_progress)
    assert killed, "the run ended before a worker could be killed"
    uri = summary.tracking_uri
    assert client_for(uri).get_run(summary.run_id).info.status == "FINISHED"
    # Every step exactly once, the final one included, although steps after the checkpoint ran twice.
    assert steps(uri, summary.run_id, "train_loss") == list(range(1, total + 1))
    assert steps(uri, summary.run_id, "eval_loss") == [0, *range(evals, total, evals), total]
    # Resumed from the latest checkpoint Ray Train had recorded when the worker died (or one it
    # recorded after the test looked), never from one past the step the worker died at. How many
    # steps that loses is not fixed: the progress updates the kill waits for come at most twice a
    # second, and Ray Train records a checkpoint only when it next polls the workers (every 0.5 s
    # here), so the kill can land more than one interval after the last recorded checkpoint.
    [resumed] = steps(uri, summary.run_id, "resumed_from_step")
    assert resumed % every == 0 and killed["saved"] <= resumed <= killed["step"], (killed, resumed)
    assert summary.registered_model["version"] == "1"
    # Exact resume with streamed data: every evaluation equals an uninterrupted run's with the same seed.
    history = lambda s: [m.value for m in sorted(client_for(s.tracking_uri).get_metric_history(s.run_id, "eval_loss"),
                                                  key=lambda m: m.step)]  # noqa: E731
    assert history(summary) == pytest.approx(history(clean), abs=1e-4)
    assert summary.metrics["eval_loss"] == pytest.approx(clean.metrics["eval_loss"], abs=1e-4)


# --- the driver is stopped; running the job again resumes it ----------------------------------------------
#
# These runs, and the run on S3 storage below, carry fake secrets where they travel: the
# MLflow server requires a password (in `tracking.uri` for the driver runs, in MLFLOW_TRACKING_USERNAME /
# MLFLOW_TRACKING_PASSWORD for the S3 run), the storage needs AWS_SECRET_ACCESS_KEY, the local Ray
# instance runs with token authentication (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN), HF_TOKEN is set.

MLFLOW_USER = "admin"
SECRETS = {"HF_TOKEN": "hf_FAKEtoken0123456789", "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-pass-4242",
           "MLFLOW_TRACKING_TOKEN": "fake-mlflow-token-4343", "AWS_SECRET_ACCESS_KEY": "fakeAwsSecretKey/4444",
           "RAY_AUTH_TOKEN": "fake-ray-token-4545-0123456789abcdef"}
BUCKET = "fault-runs"


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with a sqlite store; stop() and start() keep the store.
    With `auth` (user, password): MLflow's basic-auth app, which answers no API call without them."""

    def __init__(self, root: Path, auth: tuple[str, str] | None = None):
        self.root, self.port, self.proc, self.auth = root, free_port(), None, auth
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"

    @property
    def uri_with_password(self) -> str:
        user, password = self.auth
        return f"http://{user}:{password}@127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root}/server.db",
               "--artifacts-destination", str(self.root / "artifacts")]
        env = dict(os.environ)
        if self.auth:
            config = self.root / "basic_auth.ini"
            config.write_text(f"[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                              f"database_uri = sqlite:///{self.root}/auth.db\nadmin_username = {self.auth[0]}\n"
                              "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
            cmd[4:4] = ["--app-name", "basic-auth"]
            env.update(MLFLOW_AUTH_CONFIG_PATH=str(config), MLFLOW_AUTH_ADMIN_PASSWORD=self.auth[1],
                       MLFLOW_FLASK_SERVER_SECRET_KEY="fault-test-csrf-key")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).close()
                break
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, \
                    f"mlflow server did not start: {self.log.read_text()[-2000:]}"
                time.sleep(0.3)
        if self.auth:  # the server does require the credentials
            api = f"{self.uri}/api/2.0/mlflow/experiments/search?max_results=1"
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(api, timeout=10)
            assert refused.value.code == 401

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (a clean stop; `kill`: SIGKILL, for a server whose store is not needed again)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-auth"),
                          auth=(MLFLOW_USER, SECRETS["MLFLOW_TRACKING_PASSWORD"]))
    try:
        server.start()
        yield server
    finally:
        server.stop(kill=True)


@pytest.fixture(scope="module")
def ray_tmp():
    """RAY_TMPDIR of the CLI runs: their Ray instances keep their session logs here (short: it
    holds Ray's unix sockets)."""
    path = Path(tempfile.mkdtemp(prefix="rayf-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _run_env(ray_tmp: Path, s3_env: dict[str, str], **more: str) -> dict[str, str]:
    """The environment of a CLI run: HF, AWS and Ray secrets (Ray with token authentication)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "AWS_", "RAY_AUTH"))}
    return {**env, "COLUMNS": "200", "RAY_TMPDIR": str(ray_tmp), "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": SECRETS["RAY_AUTH_TOKEN"], "HF_TOKEN": SECRETS["HF_TOKEN"], **s3_env, **more}


# The stopped-and-resumed run: a checkpoint every 4 steps; the first attempt is stopped after the
# first one Ray Train recorded (polled every 0.2 s), well before the last step (12 steps later: some
# seconds on 2 cores; recording takes up to 0.5 s).
RESUMED_STEPS = 16
RESUMED_NAME = "fault-driver"


def _sets(uri: str, **more) -> list[str]:
    return [f"{k}={v}" for k, v in {
        "name": RESUMED_NAME, "registry.name": RESUMED_NAME, "tracking.uri": uri,
        "data.train": f"s3://{BUCKET}/data/train.jsonl", "data.eval": f"s3://{BUCKET}/data/eval.jsonl",
        "storage.path": f"s3://{BUCKET}/runs", "training.max_steps": RESUMED_STEPS, "training.checkpoint_every": 4,
        "training.eval_every": 8, "training.eval_batches": 1, **more}.items()]


def _cli(sets: list[str]) -> list[str]:
    return [sys.executable, "-m", "orchestrator", "run", str(REPO / "jobs" / "quickstart.yaml"), "--json",
            *[x for kv in sets for x in ("--set", kv)]]


def _stop_session(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of `proc` and every process left in its session (Ray's own)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    left = [p for p in psutil.process_iter() if _sid(p.pid) == proc.pid]
    for p in left:
        p.kill()
    psutil.wait_procs(left, timeout=60)


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _stopped_and_resumed(first_cli: list[str], first_env: dict[str, str], second_cli: list[str],
                         second_env: dict[str, str], cwd: Path, saved_step, between=None) -> dict:
    """Run `first_cli` until `saved_step()` finds a checkpoint Ray Train recorded, stop the driver
    (its whole session, its Ray instance with it), call `between(first attempt's stderr)`, then run
    `second_cli`, the same job, to the end."""
    first = subprocess.Popen(first_cli, cwd=cwd, env=first_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while (saved := saved_step()) is None:
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
            time.sleep(0.2)
        assert first.poll() is None, "the first attempt ended before it could be stopped"
        _stop_session(first)
    finally:
        if first.poll() is None:
            _stop_session(first)
    first_out, first_err = first.communicate()
    if between is not None:
        between(first_err)
    second = subprocess.run(second_cli, cwd=cwd, env=second_env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    return {"saved": saved, "console": first_out + first_err + second.stdout + second.stderr,
            "first_err": first_err, "second_err": second.stderr, "summary": json.loads(second.stdout)}


def _killed_mid_save(temp: Path, first_err: str) -> None:
    """What a worker killed while writing a checkpoint leaves in its temporary directory (the kill
    lands there only sometimes, so it is put there for certain): rank 0's staging directory for
    the run, an adapter half written."""
    from orchestrator.training.worker import checkpoint_staging

    run_id = re.search(r"MLflow run (\w+)", first_err)[1]
    staging = temp / checkpoint_staging(run_id, 0).name / "adapter"
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "adapter_config.json").write_text("{}")


def _bucket_objects(bucket) -> dict[str, bytes]:
    return {key: bucket.get_object(Bucket=BUCKET, Key=key)["Body"].read() for key in bucket_keys(bucket, BUCKET)}


def _s3_saved_step(bucket) -> int | None:
    """The step of the latest checkpoint Ray Train recorded in the bucket, read with boto3 (not
    with the product's `latest_checkpoint`, which the resumed run is checked with)."""
    keys = bucket_keys(bucket, BUCKET)
    for key in keys:
        if key.endswith("/checkpoint_manager_snapshot.json"):
            snapshot = json.loads(bucket.get_object(Bucket=BUCKET, Key=key)["Body"].read())
            latest = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
            state = f"{key.rsplit('/', 1)[0]}/{latest}/train_state.json"
            if latest and state in keys:
                return json.loads(bucket.get_object(Bucket=BUCKET, Key=state)["Body"].read())["step"]
    return None


@pytest.fixture(scope="module")
def stopped_and_resumed(tmp_path_factory, tiny_base, auth_server, ray_tmp):
    """The quickstart with its data and its checkpoints (`storage.path`) in an S3 bucket on a local
    server (moto's), tracked on the password-protected MLflow server: stopped once its first
    checkpoint is in the bucket, then run again, resuming from it. The attempts carry the MLflow
    password as a user who moves it out of the job file would: the first in `tracking.uri`, the
    second in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (and a token beside them)."""
    tmp = tmp_path_factory.mktemp("s3run")
    # The attempts' own temporary directory: what they leave in it is checked.
    temp = tmp_path_factory.mktemp("s3run-temp")
    with local_s3(BUCKET, "AKIAFAKEFAULTTEST", SECRETS["AWS_SECRET_ACCESS_KEY"]) as (s3_env, bucket):
        first_env = _run_env(ray_tmp, s3_env, TMPDIR=str(temp))
        second_env = {**first_env, "MLFLOW_TRACKING_USERNAME": MLFLOW_USER,
                      "MLFLOW_TRACKING_PASSWORD": SECRETS["MLFLOW_TRACKING_PASSWORD"],
                      "MLFLOW_TRACKING_TOKEN": SECRETS["MLFLOW_TRACKING_TOKEN"]}
        # The data is read from the bucket too (Ray Data, credentials and endpoint from the environment).
        for split in ("train", "eval"):
            bucket.upload_file(str(REPO / "jobs" / "data" / "quickstart" / f"{split}.jsonl"), BUCKET, f"data/{split}.jsonl")
        r = _stopped_and_resumed(_cli(_sets(auth_server.uri_with_password)), first_env,
                                 _cli(_sets(auth_server.uri)), second_env, tmp,
                                 saved_step=lambda: _s3_saved_step(bucket),
                                 between=lambda err: _killed_mid_save(temp, err))
        return {"tmp": tmp, "temp": temp, "objects": _bucket_objects(bucket), **r}


def test_a_stopped_driver_is_resumed_by_running_the_job_again(stopped_and_resumed, auth_server, tmp_path):
    """The same MLflow run continues from the checkpoint the stopped attempt saved in the bucket,
    though the password moved from `tracking.uri` to the environment: every step logged once,
    one run of the job, the model registered once (its adapter fetched from the bucket, no copy
    of it left behind, nor the half-written one a worker killed while saving left), the data read
    from the bucket."""
    from orchestrator.tracking.registry import download_model

    r = stopped_and_resumed
    run_id, uri = r["summary"]["run_id"], auth_server.uri_with_password
    assert f"MLflow run {run_id}" in r["first_err"]
    said = re.search(rf"Resuming the stopped MLflow run {run_id} from its checkpoint at step (\d+) of", r["second_err"])
    assert said, r["second_err"][-3000:]
    [resumed] = steps(uri, run_id, "resumed_from_step")
    assert int(said[1]) == resumed >= r["saved"], (said[0], resumed, r["saved"])
    assert client_for(uri).get_run(run_id).info.status == "FINISHED"
    assert steps(uri, run_id, "train_loss") == list(range(1, RESUMED_STEPS + 1))
    experiment = client_for(uri).get_experiment_by_name("quickstart").experiment_id
    assert len(client_for(uri).search_runs([experiment], filter_string=f"attributes.run_name = '{RESUMED_NAME}'")) == 1
    assert r["summary"]["registered_model"]["version"] == "1"
    assert r["summary"]["measured"]["artifact_dir"].startswith(f"s3://{BUCKET}/runs/"), r["summary"]["measured"]
    registered = download_model(f"models:/{RESUMED_NAME}/1", tmp_path / "v1", uri)
    assert (registered / "adapter_model.safetensors").stat().st_size > 0
    assert not adapter_copies(r["temp"])  # no copy of a checkpoint, whole or in part, left in TMPDIR
    assert "fetching from storage.path (MiB)" in r["second_err"]  # the download had a progress bar
    # Its data came from the bucket: every record of the quickstart files, tokenized, none truncated.
    local = [sum(1 for line in open(REPO / "jobs" / "data" / "quickstart" / f"{split}.jsonl") if line.strip())
             for split in ("train", "eval")]
    data = r["summary"]["data"]
    assert [data["train_examples"], data["eval_examples"], data["truncated_examples"]] == [*local, 0], data


def test_only_a_stopped_latest_run_is_resumed(stopped_and_resumed, auth_server):
    """A job whose latest run finished starts a new run; one whose latest run stopped (here:
    marked KILLED for a moment) is picked up again; another spec is another job."""
    from orchestrator.spec import load_spec
    from orchestrator.tracking.runs import resumable_run

    run_id = stopped_and_resumed["summary"]["run_id"]
    spec = load_spec(REPO / "jobs" / "quickstart.yaml", _sets(auth_server.uri_with_password))
    client = client_for(spec.tracking.uri)
    assert resumable_run(spec) is None
    client.set_terminated(run_id, "KILLED")
    try:
        assert resumable_run(spec).run_id == run_id
        spec.training.max_steps = RESUMED_STEPS + 1
        assert resumable_run(spec) is None
    finally:
        client.set_terminated(run_id, "FINISHED")


def _all_text_under(root: Path) -> str:
    out = []
    for f in root.rglob("*"):
        if f.is_file():
            out.append(f.read_bytes().decode("latin-1"))
    return "\n".join(out)


def _run_record(uri: str, run_id: str, into: Path) -> dict[str, str]:
    """What MLflow holds of a run, as text: params, tags, metric names, artifacts (downloaded)."""
    client = client_for(uri)
    run = client.get_run(run_id)
    into.mkdir()
    return {"params": json.dumps(run.data.params), "tags": json.dumps(run.data.tags),
            "metric names": json.dumps(list(run.data.metrics)),
            "artifacts": _all_text_under(Path(client.download_artifacts(run_id, "", str(into))))}


def test_no_secret_appears_in_anything_a_run_writes(stopped_and_resumed, auth_server, ray_tmp, tmp_path):
    r = stopped_and_resumed
    uri = auth_server.uri_with_password
    written = {"the attempts' console": r["console"],
               **{f"the run's {k}": v for k, v in _run_record(uri, r["summary"]["run_id"], tmp_path / "run").items()},
               "the working directory": _all_text_under(r["tmp"]),
               **{f"s3://{BUCKET}/{k}": v.decode("latin-1") for k, v in r["objects"].items()},
               "MLflow server (log, store, artifacts)": _all_text_under(auth_server.root),
               "Ray session logs": _all_text_under(ray_tmp)}
    # The searches did read something from every source (an S3 "directory" object and the working
    # directory may be empty; the bucket as a whole may not).
    empty = [k for k, v in written.items() if not v and not k.startswith(("s3://", "the working"))]
    assert not empty, f"nothing read from {empty}"
    storage = "\n".join(v.decode("latin-1") for k, v in r["objects"].items() if k.startswith("runs/"))
    assert "deepspeed" in storage  # the checkpoints were searched too
    assert any(k.endswith("checkpoint_manager_snapshot.json") for k in r["objects"]), sorted(r["objects"])
    assert len(list(ray_tmp.rglob("session_*/logs/raylet.out"))) >= 2  # the two attempts' Ray instances
    assert r["summary"]["run_id"] in written["MLflow server (log, store, artifacts)"]
    leaks = []
    for name, secret in SECRETS.items():
        for where, text in written.items():
            if (at := text.find(secret)) >= 0:
                leaks.append(f"{name} in {where}: ...{text[max(0, at - 150):at + len(secret) + 50]!r}...")
    assert not leaks, "secrets leaked:\n" + "\n".join(leaks)


# --- the MLflow server goes away mid-run and comes back -------------------------------------------------


def test_mlflow_server_down_mid_run_loses_no_metric(tmp_path, ray_local, tiny_base):
    from orchestrator.training.recipe import run_job

    server = MlflowServer(tmp_path)
    server.start()
    total = 12
    spec = quickstart(tmp_path, name="fault-mlflow", **{
        "tracking.uri": server.uri, "training.max_steps": total, "training.checkpoint_every": 6,
        "training.eval_every": 3, "training.eval_batches": 1})
    events: list[str] = []
    restart = threading.Thread(target=server.start)

    def on_status(line: str) -> None:
        # The run exists in MLflow; the server goes away before any worker has logged a metric.
        if line.startswith("Training "):
            server.stop()
            events.append("stopped")

    def on_progress(task, step, _total, _metrics):
        # It comes back once the last step is done (rank 0 then waits for it, within a bound).
        if task == "training" and step >= total and not restart.is_alive() and "restarting" not in events:
            events.append("restarting")
            restart.start()

    try:
        summary = run_job(spec, status=on_status, progress=on_progress)
        assert events == ["stopped", "restarting"]
        client = client_for(server.uri)
        assert client.get_run(summary.run_id).info.status == "FINISHED"
        for key in ("train_loss", "learning_rate", "tokens_per_s", "step_time_s"):
            assert steps(server.uri, summary.run_id, key) == list(range(1, total + 1)), key
        assert steps(server.uri, summary.run_id, "eval_loss") == [0, 3, 6, 9, 12]
        assert steps(server.uri, summary.run_id, "base_eval_loss") == [0]
    finally:
        if restart.is_alive():
            restart.join()
        server.stop()
