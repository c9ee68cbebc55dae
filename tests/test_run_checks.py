"""`orchestrator run` refuses, before any worker starts, jobs that cannot work."""

import os
import subprocess
import sys

from conftest import REPO


def run_cli(*args, cwd):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "orchestrator", "run", str(REPO / "jobs" / "quickstart.yaml"), *args],
                          capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_a_gpu_job_that_cannot_fit_is_refused_with_the_plan_and_changes(tmp_path, tiny_base):
    proc = run_cli("--set", "distributed.use_gpu=true", "--gpu-memory", "100MiB", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "does not fit" in proc.stdout + proc.stderr
    assert "pass --force to run anyway" in proc.stderr
    # Nothing was trained or tracked.
    assert not (tmp_path / "runs").exists()


def test_a_local_gpu_job_without_gpus_is_refused(tmp_path, tiny_base):
    proc = run_cli("--set", "distributed.use_gpu=true", "--gpu-memory", "80GiB", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "distributed.use_gpu: the job asks for 2 GPU worker(s) but this machine has 0 GPU(s)" in proc.stderr
