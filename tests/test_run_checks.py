"""`orchestrator run` refuses, before any worker starts, jobs that cannot work."""

import os
import subprocess
import sys

import pytest

from conftest import REPO, side_by_side


@pytest.fixture(scope="module")
def refused(tmp_path_factory, tiny_base) -> dict:
    """`orchestrator run` of the quickstart as a GPU job, each in an empty working directory, the
    processes side by side: {case: (its result, its working directory)}."""
    cases = {"cannot fit": ["--gpu-memory", "100MiB"], "no gpus": ["--gpu-memory", "80GiB"]}
    cwds = [tmp_path_factory.mktemp(case.replace(" ", "-")) for case in cases]
    procs = side_by_side([[sys.executable, "-m", "orchestrator", "run", str(REPO / "jobs" / "quickstart.yaml"),
                           "--set", "distributed.use_gpu=true", *args] for args in cases.values()],
                         cwds=cwds, env={**os.environ, "COLUMNS": "200"})
    return dict(zip(cases, zip(procs, cwds)))


def test_a_gpu_job_that_cannot_fit_is_refused_with_the_plan_and_changes(refused):
    proc, cwd = refused["cannot fit"]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "does not fit" in proc.stdout + proc.stderr
    assert "pass --force to run anyway" in proc.stderr
    # Nothing was trained or tracked.
    assert not (cwd / "runs").exists()


def test_a_local_gpu_job_without_gpus_is_refused(refused):
    proc, _ = refused["no gpus"]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "distributed.use_gpu: the job asks for 2 GPU worker(s) but this machine has 0 GPU(s)" in proc.stderr


STDOUT_PROBE = """
import json, os, subprocess, sys
from ray._private.worker import print_to_stdstream
from orchestrator.cli import _stdout_for_results_only

with _stdout_for_results_only():
    print("a library's print")
    os.write(1, b"a write to file descriptor 1\\n")
    subprocess.run([sys.executable, "-c", "print('a child process')"], check=True)
    # What Ray's driver thread does with a raylet notice (a worker died, a task was retried).
    print_to_stdstream({"lines": ["A worker died or was killed"], "pid": "raylet", "is_err": False},
                       ignore_prefix=False)
print(json.dumps({"result": 1}))
"""


def test_while_ray_runs_stdout_is_kept_for_the_result():
    """`run --json | jq` must parse: Ray prints raylet notices on the driver's stdout, so the CLI
    sends everything written there while Ray runs to stderr, and the result alone to stdout."""
    proc = subprocess.run([sys.executable, "-c", STDOUT_PROBE], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == '{"result": 1}\n'
    for text in ("a library's print", "a write to file descriptor 1", "a child process", "(raylet)",
                 "A worker died or was killed"):
        assert text in proc.stderr, text


def test_the_summary_of_a_run_without_eval_examples_says_so(capsys):
    """A run whose data has no eval split has no eval loss (NaN from the workers): the summary says
    it was not evaluated, instead of "nan (base) -> nan (fine-tuned), nan% lower"."""
    from types import SimpleNamespace

    from orchestrator.cli.job import _print_summary

    nan = float("nan")
    summary = SimpleNamespace(
        metrics={"base_eval_loss": nan, "eval_loss": nan, "train_loss": 3.35, "tokens_per_s": 8000.0, "wall_s": 27.5},
        data={"train_examples": 2000, "eval_examples": 0, "truncated_examples": 0}, timings=None,
        run_id="r1", experiment="quickstart", tracking_uri="sqlite:///mlflow.db",
        registered_model={"uri": "models:/quickstart@candidate", "version": "1"})
    _print_summary(summary)
    out = capsys.readouterr().out
    assert "not evaluated: no eval examples (data.eval)" in out and "nan" not in out.lower(), out
    summary.metrics.update(base_eval_loss=3.8, eval_loss=0.019)
    _print_summary(summary)
    assert "3.8000 (base) -> 0.0190 (fine-tuned), 99.5% lower" in capsys.readouterr().out
