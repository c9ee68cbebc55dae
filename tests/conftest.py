"""Session-wide fixtures: one built tiny model and one Ray instance for the whole test run."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILTIN_BASE = "builtin:tiny-llama"

# Pre-training the built-in base takes about a minute and a half of one core when it is not in the
# cache (a fresh machine, CI). It then runs in a process of its own from the end of collection,
# while the modules that never use it run first on the other core (`pytest_collection_modifyitems`);
# `tiny_base` waits for it. The process is stopped at the end of the session if still running.
_base_build: dict = {}


@pytest.hookimpl(trylast=True)  # after pytest's own reordering and any deselection
def pytest_collection_modifyitems(session, config, items):
    users = {item.module for item in items if "tiny_base" in item.fixturenames}
    # A stable sort by module: each module's tests stay together and in their order.
    items[:] = sorted(items, key=lambda item: item.module in users)
    if users and not config.option.collectonly:
        from orchestrator.models.builtin import is_built

        if not is_built(BUILTIN_BASE):
            log = tempfile.TemporaryFile()
            code = f"from orchestrator.models.builtin import resolve_builtin; resolve_builtin({BUILTIN_BASE!r})"
            _base_build["log"] = log
            _base_build["process"] = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=log,
                                                      start_new_session=True)


def pytest_sessionfinish(session, exitstatus):
    process = _base_build.get("process")
    if process is not None and process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)  # with the build's own child process
        process.wait()


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    """The built-in demo base, built (deterministically) once and cached like `make demo` does:
    by the session's background build when one was started, else here."""
    from orchestrator.models.builtin import resolve_builtin

    if (process := _base_build.get("process")) is not None and process.wait() != 0:
        log = _base_build["log"]
        log.seek(0)
        pytest.fail(f"building {BUILTIN_BASE} failed:\n{log.read().decode(errors='replace')[-3000:]}")
    return Path(resolve_builtin(BUILTIN_BASE))


@pytest.fixture(scope="session")
def tokenizer(tiny_base):
    from orchestrator.models.loading import load_tokenizer

    return load_tokenizer(str(tiny_base))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (2 CPUs) shared by every test that trains; stopped at the end.
    With the dashboard's state API, which a search needs to free the workers of stopped trials."""
    from orchestrator.training import launch

    launch.connect(None, dashboard=True)
    yield
    launch.shutdown()


# The session's quickstart run: the job as a user runs it, 60 steps, registered as an adapter and
# as a merged model. test_end_to_end checks the run (tracking, the falling loss, generation);
# test_registry the registry's workflows on its two versions. One run instead of two: each run
# costs some 30 s of Ray Train and DeepSpeed start-up on 2 cores, whatever its steps.
QUICKSTART_RUN = "e2e-zero2"


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory, ray_local, tiny_base):
    """(spec, summary) of QLoRA on the 4-bit base, ZeRO-2 on 2 workers, 60 steps, evaluated every
    20, registered as QUICKSTART_RUN (adapter, @candidate) and QUICKSTART_RUN-merged. The run's
    progress updates, (task, step, total, metrics) as the CLI's bar gets them, are in
    QUICKSTART_PROGRESS."""
    from orchestrator.spec import load_spec
    from orchestrator.training.recipe import run_job

    tmp = tmp_path_factory.mktemp("quickstart-run")
    sets = {"name": QUICKSTART_RUN, "registry.name": QUICKSTART_RUN, "registry.mode": "both",
            "tracking.uri": f"sqlite:///{tmp}/mlflow.db", "storage.path": str(tmp / "runs"),
            "training.max_steps": 60, "training.eval_every": 20}
    spec = load_spec(REPO / "jobs" / "quickstart.yaml", [f"{k}={v}" for k, v in sets.items()])
    return spec, run_job(spec, progress=lambda *update: QUICKSTART_PROGRESS.append(update))


QUICKSTART_PROGRESS: list[tuple] = []


def side_by_side(commands: list[list[str]], cwds: list | None = None, env: dict | None = None,
                 timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Run `commands` as processes at the same time (a CLI process keeps about one core busy;
    this machine has two) and return their results in order, output as text. Their output goes
    through temporary files, so no process waits on a full pipe while another is read."""
    files = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in commands]
    procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err)
             for cmd, cwd, (out, err) in zip(commands, cwds or [None] * len(commands), files)]
    results = []
    try:
        for cmd, proc, (out, err) in zip(commands, procs, files):
            proc.wait(timeout=timeout)
            out.seek(0), err.seek(0)
            results.append(subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read()))
    finally:
        for proc, (out, err) in zip(procs, files):
            if proc.poll() is None:  # one timed out: none is left running
                proc.kill()
                proc.wait()
            out.close(), err.close()
    return results


def free_port() -> int:
    """A port on 127.0.0.1 nothing listens on (once the probing socket is closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_s3(bucket: str, key_id: str, secret: str):
    """A real S3 server (moto's) on 127.0.0.1 holding one empty `bucket`, stopped when the block
    ends: (the AWS_* environment a run needs to reach it, a boto3 client of it)."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": key_id,
               "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1"}
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                              aws_access_key_id=key_id, aws_secret_access_key=secret)
        client.create_bucket(Bucket=bucket)
        yield env, client
    finally:
        server.stop()


def bucket_keys(client, bucket: str) -> list[str]:
    return [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]


def adapter_copies(under: Path) -> list[Path]:
    """Adapter files (a checkpoint's or a registered version's) anywhere under `under`."""
    return list(under.rglob("adapter_config.json"))


# Two prompts of one length in tokens (no padding in a batch of them).
SAME_LENGTH_PROMPTS = ["Describe the animal.\nA cat.", "Describe the animal.\nA dog."]


def serve_two_versions_gathered(spec, summary, max_tokens: int):
    """The run's registered version registered again (version 2, no retraining), both held as a
    `serve` replica holds them (ServedAdapters), and SAME_LENGTH_PROMPTS to each gathered into one
    `complete_many`: (the ServedAdapters, its answers to [v1, v1, v2, v2])."""
    from typer.testing import CliRunner

    from orchestrator.cli import app
    from orchestrator.serving.adapters import ServedAdapters

    uri = summary.tracking_uri
    result = CliRunner().invoke(app, ["register", summary.run_id, "--mode", "adapter", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    refs = [f"models:/{spec.registered_name}/1", f"models:/{spec.registered_name}/2"]
    served = ServedAdapters(refs, uri)
    served.load()
    answers = served.complete_many([dict(ref=ref, prompt=p, max_tokens=max_tokens)
                                    for ref in refs for p in SAME_LENGTH_PROMPTS])
    return served, answers
