"""Every bad input `orchestrator run` can meet, through the CLI: a message naming what and where,
exit code 2, no traceback, and no Ray worker started (the run stops before it connects to Ray)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO, free_port, local_s3

ALPACA = {"instruction": "Describe the animal.", "input": "a cat", "output": "It is a cat."}


def jsonl(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


# (case id, files to write into the job directory, job-file text or None for the quickstart, --set
#  overrides, expected text in the error output)
CASES = [
    ("malformed YAML", {}, "name: x\ndata: [unclosed\n", [], "(file): malformed YAML at line 3"),
    ("unknown key", {}, None, ["training.max_stesp=3"],
     "training.max_stesp: unknown key. Fix: did you mean 'max_steps'?"),
    ("wrong type", {}, None, ["training.micro_batch_size=many"],
     "training.micro_batch_size: Input should be a valid integer"),
    ("out of range", {}, None, ["peft.dropout=1.5"], "peft.dropout: Input should be less than 1"),
    ("incompatible combination", {}, None, ["distributed.deepspeed.offload_params=true"],
     "distributed.deepspeed.offload_params: parameter offload needs ZeRO stage 3"),
    ("target module the model lacks", {}, None, ["peft.target_modules=[q_proj,qkv_proj]"],
     "peft.target_modules: the model has no linear module named qkv_proj. Fix: choose from down_proj, "
     "gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
    ("missing base model", {}, None, ["model.base=./no-such-model"],
     "model.base: no model directory with a config.json at"),
    ("base neither a directory nor a hub id", {}, None, ["model.base=not a model!"],
     "model.base: 'not a model!' is neither a model directory nor a hub id. Fix: point at a directory"),
    ("hub id not cached, hub offline", {}, None, ["model.base=someone/not-cached-model-7b"],
     "model.base: the hub id 'someone/not-cached-model-7b' is not in the local hub cache and the hub cannot be "
     "reached or does not have it (HF_HUB_OFFLINE is set). Fix: download it"),
    ("base model missing files", {"model/config.json": "TINY_CONFIG"}, None, ["model.base=./model"],
     "has no weight files (*.safetensors or *.bin) and no tokenizer files"),
    ("missing data file", {}, None, ["data.train=nope.jsonl"], "data.train: file not found: nope.jsonl"),
    ("empty data file", {"train.jsonl": ""}, None, ["data.train=train.jsonl"], "train.jsonl has no records"),
    ("data not UTF-8", {"train.jsonl": b"\xff\xfe{}\n"}, None, ["data.train=train.jsonl"],
     "train.jsonl is not UTF-8 text"),
    ("malformed JSON line", {"train.jsonl": jsonl(ALPACA, "{not json")}, None, ["data.train=train.jsonl"],
     "train.jsonl:2: malformed JSON"),
    ("record missing fields", {"train.jsonl": jsonl({"instruction": "x"})}, None, ["data.train=train.jsonl"],
     "train.jsonl:1: the record lacks output (format 'alpaca' needs instruction, output)"),
    ("sequence too long, refused", {}, None, ["data.max_seq_len=16", "data.too_long=error"],
     "the record is longer than data.max_seq_len=16 tokens (data.too_long=error)"),
    ("data set too small for the batch", {"train.jsonl": jsonl(*[ALPACA] * 3)}, None, ["data.train=train.jsonl"],
     "training.micro_batch_size: 3 training examples cannot fill one micro batch on each of 2 workers (16 needed)"),
    ("MLflow server unreachable", {}, None, ["tracking.uri=http://127.0.0.1:PORT"],
     "tracking.uri: cannot reach the MLflow server at http://127.0.0.1:PORT"),
    ("storage bucket unreachable", {}, None, ["storage.path=s3://job-runs/prefix"],
     "storage.path: cannot read s3://job-runs/prefix (When getting information for bucket 'job-runs': AWS Error "
     "NETWORK_CONNECTION"),
]


@pytest.fixture
def no_ray(monkeypatch):
    """Connecting to Ray is the step before any worker starts: reaching it fails the test. The
    CLI's final Ray shutdown is skipped, so the session's shared Ray instance stays up."""
    from orchestrator.training import launch

    def connect(*_, **__):
        raise AssertionError("the run reached Ray: a bad input was not caught before workers start")

    monkeypatch.setattr(launch, "connect", connect)
    monkeypatch.setattr(launch, "shutdown", lambda: None)


@pytest.mark.parametrize("files,job_text,sets,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_any_worker_starts(tmp_path, tiny_base, no_ray, files, job_text, sets, expected):
    from orchestrator.cli import app

    job = tmp_path / "job.yaml"
    if job_text is None:
        shutil.copy(REPO / "jobs" / "quickstart.yaml", job)
        shutil.copytree(REPO / "jobs" / "data", tmp_path / "data")
    else:
        job.write_text(job_text)
    for name, content in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content == "TINY_CONFIG":
            content = (Path(tiny_base) / "config.json").read_text()
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    port = str(free_port())
    sets = [s.replace("PORT", port) for s in sets]
    expected = expected.replace("PORT", port)
    args = ["run", str(job), "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            "--set", f"storage.path={tmp_path}/runs", *[x for s in sets for x in ("--set", s)]]
    # S3 (storage.path in a bucket) at the closed port.
    s3 = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "AKIAFAKEBADINPUT",
          "AWS_SECRET_ACCESS_KEY": "fakeBadInputSecret", "AWS_DEFAULT_REGION": "us-east-1"}
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400", "HF_HUB_OFFLINE": "1", **s3})
    output = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == 2, (output, result.exception)
    assert expected in " ".join(output.split()), output
    assert "Traceback" not in output
    assert not (tmp_path / "runs").exists()


def test_storage_in_a_bucket_that_does_not_exist_is_refused(monkeypatch):
    """A bucket on a real S3 server (moto's): a prefix in it is fine (Ray Train makes it), a
    bucket that is not there is named, with the fix."""
    from orchestrator.spec import SpecError
    from orchestrator.storage import check_reachable

    with local_s3("job-runs", "AKIAFAKEBADINPUT", "fakeBadInputSecret") as (env, _):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        check_reachable("s3://job-runs/not/there/yet")
        with pytest.raises(SpecError) as refused:
            check_reachable("s3://no-such-bucket/runs")
    assert str(refused.value.problems[0]) == ("storage.path: there is no bucket 'no-such-bucket' at "
                                              "s3://no-such-bucket/runs. Fix: create it, or name a bucket that exists")
