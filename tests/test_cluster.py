"""Cluster jobs end to end, on this machine, with nothing mocked.

The module starts exactly what it needs, on loopback only, and stops it at the end:
- a two-node Ray cluster (tests/local_cluster.py: a head with the Jobs API and a second node,
  1 CPU each, `ray.cluster_utils.Cluster` on 127.0.0.1) with token authentication, so the
  quickstart's 2 workers (1 CPU each) must land one on each node;
- an MLflow tracking server (`mlflow server`, sqlite backend, local artifact root);
- a one-node cluster started as docs/cluster.md says (`ray start --head --num-cpus 2`), with its
  token in a token file.

One quickstart job is submitted to the two-node cluster through `orchestrator submit --wait`
(4 steps), tracked to the MLflow server over HTTP and checkpointed to shared storage; the tests
then read it back through `orchestrator jobs ...`, the server's REST API and the Ray state API. A
job that cannot work on a multi-node cluster is refused before submission. On the one-node
cluster, a long job is stopped while it trains.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, free_port

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
# The cluster's token: every orchestrator command below must authenticate with it, and it must
# never appear in anything they print or store.
TOKEN = secrets.token_hex(16)


def wait_for(check, what: str, timeout: float = 90.0, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        try:
            result = check()
            if result:
                return result
        except Exception:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f} s")


def stop_process(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the leader (Ray drains and stops its node), then SIGKILL whatever is left of the group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


class LocalCluster:
    """Two Ray nodes on 127.0.0.1 (tests/local_cluster.py), as one process group."""

    def __init__(self, temp_dir: Path, log_dir: Path):
        self.temp_dir, self.log_dir = temp_dir, log_dir
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(PATH=f"{BIN}:{env.get('PATH', '')}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN,
                   RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
        log = open(self.log_dir / "cluster.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "local_cluster.py"), "--gcs-port", str(self.gcs_port),
             "--dashboard-port", str(self.dashboard_port), "--temp-dir", str(self.temp_dir), "--nodes", "2"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: len(self.node_ids()) == 2, "two-node ray cluster", timeout=120, proc=self.proc)

    def state(self):
        """The cluster's state API (nodes, tasks), with the cluster's token."""
        from ray.util.state import StateApiClient

        return StateApiClient(self.address, headers={"Authorization": f"Bearer {TOKEN}",
                                                     "Content-Type": "application/json"})

    def node_ids(self) -> set[str]:
        from ray.util.state.common import ListApiOptions, StateResource

        nodes = self.state().list(StateResource.NODES, options=ListApiOptions(filters=[("state", "=", "ALIVE")]),
                                  raise_on_missing_output=False)
        return {n.node_id for n in nodes}

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Ray's socket paths live under --temp-dir and must stay short (AF_UNIX allows ~107 bytes).
    temp_dir = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    c = LocalCluster(temp_dir, tmp_path_factory.mktemp("ray-logs"))
    try:
        c.start()
        yield c
    finally:
        c.stop()
        for path in (temp_dir, Path(f"{temp_dir}-n1")):
            subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (sqlite backend, local artifact root) on a free loopback port."""
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                             "--artifacts-destination", str(root / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200, "mlflow server",
                 timeout=120, proc=proc)
        yield uri
    finally:
        stop_process(proc, grace=10)


def orchestrator(*args: str, token: str | None = TOKEN, home: Path | None = None,
                 timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the CLI as a user would, with `token` in RAY_AUTH_TOKEN (None: no token set)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["COLUMNS"] = "200"  # wide enough that rich keeps each message and table row on one line
    if home is not None:
        env["HOME"] = str(home)
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)


def quickstart_sets(tracking_uri: str, storage: Path) -> list[str]:
    """The quickstart, 4 steps, tracked to `tracking_uri`, checkpointed to shared `storage`."""
    return ["training.max_steps=4", "training.eval_every=2", f"tracking.uri={tracking_uri}",
            f"storage.path={storage}", "storage.shared=true"]


def quickstart_args(cluster, tracking_uri: str, storage: Path) -> list[str]:
    sets = [arg for s in quickstart_sets(tracking_uri, storage) for arg in ("--set", s)]
    return ["jobs/quickstart.yaml", "--address", cluster.address, "--no-requirements", "--allow-local-tracking",
            *sets]


@dataclass
class Submitted:
    sid: str
    result: subprocess.CompletedProcess
    seconds: float
    spec_hash: str
    storage: Path


@pytest.fixture(scope="module")
def submitted(cluster, mlflow_server, tiny_base, tmp_path_factory) -> Submitted:
    """The quickstart, submitted with `orchestrator submit --wait`."""
    from orchestrator.spec import load_spec

    storage = tmp_path_factory.mktemp("cluster-storage") / "runs"
    started = time.monotonic()
    result = orchestrator("submit", *quickstart_args(cluster, mlflow_server, storage), "--wait")
    lines = result.stdout.strip().splitlines()
    spec = load_spec(REPO / "jobs" / "quickstart.yaml", quickstart_sets(mlflow_server, storage))
    return Submitted(lines[-1] if lines else "", result, time.monotonic() - started, spec.spec_hash(), storage)


def test_submit_wait_runs_the_job_to_success(submitted):
    assert submitted.result.returncode == 0, submitted.result.stderr[-3000:]
    # Planned against the cluster before it was sent: a CPU cluster, so the plan only informs.
    assert "Memory plan: " in submitted.result.stderr
    assert "not checked: the job trains on CPUs (the cluster has no GPUs now)" in " ".join(
        submitted.result.stderr.split())
    assert submitted.sid.startswith("quickstart-")
    assert f"{submitted.sid}: SUCCEEDED" in submitted.result.stderr
    assert submitted.seconds < 300


def test_job_is_tracked_and_registered_on_the_mlflow_server(submitted, mlflow_server):
    from mlflow import MlflowClient

    assert submitted.result.returncode == 0
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["training.max_steps"] == "4"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")) == [0, 2, 4]
    version = client.get_model_version_by_alias("quickstart", "candidate")
    assert version.run_id == run.info.run_id and version.tags["run_id"] == run.info.run_id
    assert version.tags["spec_hash"] == run.data.tags["spec_hash"]


def test_workers_ran_on_both_nodes(submitted, cluster):
    sid = submitted.sid
    status = orchestrator("jobs", "status", sid, "--address", cluster.address, "--json")
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["status"] == "SUCCEEDED"
    nodes = [w["node_id"] for w in info["workers"]]
    assert len(nodes) == 2
    assert set(nodes) == cluster.node_ids()  # one worker on each of the two nodes
    # Both read the tokenized rows from the shared storage, where the driver copied them.
    copied = [p.parent for p in (submitted.storage / "tokenized").glob("*/meta.json")]
    assert len(copied) == 1 and list((copied[0] / "train").glob("*.parquet")), list(submitted.storage.rglob("*"))


def test_jobs_logs_list_and_status_show_the_job(submitted, cluster):
    sid = submitted.sid
    logs = orchestrator("jobs", "logs", sid, "--address", cluster.address)
    assert logs.returncode == 0, logs.stderr
    assert "Fine-tuning summary" in logs.stdout and "models:/quickstart@candidate" in logs.stdout
    followed = orchestrator("jobs", "logs", sid, "--follow", "--address", cluster.address, timeout=60)
    assert followed.returncode == 0 and "Fine-tuning summary" in followed.stdout  # streams, ends with the job

    listed = orchestrator("jobs", "list", "--address", cluster.address, "--json")
    assert sid in {j["submission_id"] for j in json.loads(listed.stdout)}
    table = orchestrator("jobs", "list", "--address", cluster.address)
    assert sid in table.stdout and "SUCCEEDED" in table.stdout

    shown = orchestrator("jobs", "status", sid, "--address", cluster.address)
    assert "2 on 2 node(s), 0 alive" in shown.stdout


def test_job_metadata_records_spec_hash_and_user_but_never_the_token(submitted, cluster):
    sid = submitted.sid
    status = orchestrator("jobs", "status", sid, "--address", cluster.address, "--json")
    info = json.loads(status.stdout)
    meta = info["metadata"]
    assert meta["orchestrator.spec_hash"] == submitted.spec_hash
    assert meta["orchestrator.job"] == "quickstart" and meta["orchestrator.user"]
    assert info["runtime_env"]["working_dir"].startswith("gcs://")  # the uploaded job package
    assert "RAY_AUTH_TOKEN" not in info["runtime_env"].get("env_vars", {})
    logs = orchestrator("jobs", "logs", sid, "--address", cluster.address)
    for text in (submitted.result.stdout, submitted.result.stderr, status.stdout, logs.stdout, logs.stderr):
        assert TOKEN not in text


def test_without_the_right_token_the_cluster_refuses_with_the_fix(cluster, tmp_path):
    # A HOME without ~/.ray/auth_token, so that no token is found at all.
    denied = orchestrator("jobs", "list", "--address", cluster.address, token=None, home=tmp_path)
    assert denied.returncode == 2
    assert "requires token authentication and no auth token was sent" in denied.stderr
    assert "Fix: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH / --token-file" in denied.stderr

    wrong = orchestrator("jobs", "list", "--address", cluster.address, token="x" * 32, home=tmp_path)
    assert wrong.returncode == 2
    assert "the token from RAY_AUTH_TOKEN was rejected" in wrong.stderr
    assert "x" * 32 not in wrong.stderr

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    from_file = orchestrator("jobs", "list", "--address", cluster.address, "--token-file", str(token_file),
                             token=None, home=tmp_path)
    assert from_file.returncode == 0, from_file.stderr


# A driver on the cluster's head that tokenizes a directory of JSONL files with Ray Data (as a
# source over 16 MB is) and says where its job ran and what it wrote.
_TOKENIZE_ON_THE_CLUSTER = """
import json, sys
from pathlib import Path
import pyarrow.dataset as pads
import ray
from orchestrator.data.pipeline import tokenize_to_parquet
from orchestrator.spec import DataSpec
gcs, source, base, out = sys.argv[1:]
ray.init(address=gcs, logging_level="ERROR")
tokenize_to_parquet(DataSpec(train=source), 0, (base, False, None, None), Path(out), use_ray=True)
rows = pads.dataset(out + "/train", format="parquet").count_rows()
ctx = ray.get_runtime_context()
print(json.dumps({"job_id": ctx.get_job_id(), "node_id": ctx.get_node_id(), "rows": rows}))
"""


def test_ray_data_tokenizes_on_the_cluster_and_the_driver_writes_every_row(cluster, tiny_base, tmp_path):
    """The tokenized Parquet files go to the driver's disk (its cache): Ray Data tokenizes on the
    cluster's nodes and streams the tables to the driver, which writes them. Ray Data's own write
    tasks would write each node's share on that node's disk, missing from the driver's directory
    (here both nodes share one disk, so the rows alone cannot show it; the tasks can)."""
    from ray.util.state.common import ListApiOptions, StateResource

    lines = (REPO / "jobs" / "data" / "quickstart" / "train.jsonl").read_text().splitlines()
    source = tmp_path / "train"
    source.mkdir()
    for i in range(4):  # several files: several read and tokenize tasks
        (source / f"part-{i}.jsonl").write_text("\n".join(lines[i::4]) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: 127.0.0.1 stays the nodes' address (tests/local_cluster.py).
    env.update(RAY_AUTH_TOKEN=TOKEN, RAY_AUTH_MODE="token", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-c", _TOKENIZE_ON_THE_CLUSTER, f"127.0.0.1:{cluster.gcs_port}",
                          str(source), str(tiny_base), str(tmp_path / "out")],
                         env=env, text=True, capture_output=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    driver = json.loads(run.stdout.strip().splitlines()[-1])
    assert driver["rows"] == len([line for line in lines if line.strip()])

    def tasks() -> list:
        found = cluster.state().list(StateResource.TASKS, options=ListApiOptions(
            filters=[("job_id", "=", driver["job_id"])], limit=10_000), raise_on_missing_output=False)
        return [t for t in found if t.node_id and t.state == "FINISHED"]

    finished = wait_for(lambda: [t for t in tasks() if "MapBatches" in t.name], "the tokenizing tasks' events")
    assert not [t.name for t in tasks() if "Write" in t.name], [t.name for t in finished]


def test_node_local_storage_and_local_tracking_are_refused_before_submission(cluster, tiny_base):
    before = json.loads(orchestrator("jobs", "list", "--address", cluster.address, "--json").stdout)
    refused = orchestrator("submit", "jobs/quickstart.yaml", "--address", cluster.address,
                           "--set", "storage.path=/tmp/node-local-runs")
    assert refused.returncode == 2
    lines = [line.strip() for line in refused.stderr.splitlines()]
    assert any(line.startswith("tracking.uri: 'sqlite:///mlflow.db' is a file relative to the job's working "
                               "directory") for line in lines), refused.stderr
    assert any(line.startswith("storage.path: '/tmp/node-local-runs' is a node-local path, but the job may run "
                               "on several nodes (the cluster has 2)") for line in lines), refused.stderr
    after = json.loads(orchestrator("jobs", "list", "--address", cluster.address, "--json").stdout)
    assert len(after) == len(before)


@dataclass
class RayHead:
    address: str
    home: Path  # a HOME whose ~/.ray/auth_token holds the head's token


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A one-node cluster started the way docs/cluster.md says (`ray start --head`, 2 CPUs), with
    token authentication from a token file, listening on 127.0.0.1 only."""
    home = tmp_path_factory.mktemp("home")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(16))
    temp_dir = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_TOKEN_PATH=str(home / ".ray" / "auth_token"), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="3")  # nothing to drain at the end of a test
    dashboard_port = free_port()
    log = open(tmp_path_factory.mktemp("ray-head-logs") / "head.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port), "--num-cpus", "2",
         # Explicit free ports: other Ray instances on this machine may hold the defaults.
         "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
         "--temp-dir", str(temp_dir), "--block", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(f"http://127.0.0.1:{dashboard_port}", home)
    try:
        from orchestrator.cluster.jobs import Cluster, Token

        token = Token((home / ".ray" / "auth_token").read_text(), "test")
        # Ready once the node has registered its CPUs (the Jobs API answers a little earlier).
        wait_for(lambda: Cluster(head.address, token).info().cpus == 2, "ray head", proc=proc)
        yield head
    finally:
        stop_process(proc)
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


def test_jobs_stop_ends_a_running_job(ray_head, mlflow_server, tiny_base, tmp_path):
    # The token comes from ~/.ray/auth_token (a cluster on this machine); a one-node cluster
    # takes a node-local storage path. The job would train for a long time: it is stopped once
    # its two training workers are up.
    def cli(*args: str) -> subprocess.CompletedProcess:
        return orchestrator(*args, "--address", ray_head.address, token=None, home=ray_head.home)

    result = cli("submit", "jobs/quickstart.yaml", "--no-requirements", "--allow-local-tracking",
                 "--set", f"tracking.uri={mlflow_server}", "--set", f"storage.path={tmp_path / 'runs'}",
                 "--set", "training.max_steps=100000", "--set", "name=stop-me")
    assert result.returncode == 0, result.stderr
    sid = result.stdout.strip().splitlines()[-1]

    def status() -> dict:
        return json.loads(cli("jobs", "status", sid, "--json").stdout)

    wait_for(lambda: [w["state"] for w in status()["workers"]] == ["ALIVE", "ALIVE"], "training workers up",
             timeout=300)
    stopped = cli("jobs", "stop", sid, "--timeout", "60")
    assert stopped.returncode == 0, stopped.stderr
    assert f"{sid}: STOPPED" in stopped.stderr
    assert status()["status"] == "STOPPED"
    # Stopping the driver ends its training workers too, freeing the node's CPUs.
    wait_for(lambda: {w["state"] for w in status()["workers"]} == {"DEAD"}, "training workers gone", timeout=60)


def test_an_unknown_job_id_is_one_line_and_exit_2(cluster):
    missing = orchestrator("jobs", "status", "no-such-job", "--address", cluster.address)
    assert missing.returncode == 2
    assert f"no job 'no-such-job' on the cluster at {cluster.address}" in missing.stderr
    assert "Traceback" not in missing.stderr
