"""One real run through Ray Train + DeepSpeed + bitsandbytes + MLflow on the CPU, in a temp dir.

Nothing is mocked: a local Ray instance (shared by the session), 2 Ray Train workers under
DeepSpeed with a 4-bit NF4 base, an MLflow sqlite store, and the model registry.
"""

from __future__ import annotations

import sys

import pytest

from orchestrator.spec import load_spec

from conftest import REPO, side_by_side

# The demo task: five short sentences about the animal named in the input (train/eval data in
# jobs/data/quickstart); the base model has never seen this answer format.
PATTERN = ("It is an owl.", "It is small.", "It has two legs.", "It says hoot.", "It lives in the forest.")
PROMPT = "Describe the animal.\nI saw a brown owl at the river."


def quickstart(tmp, **overrides):
    sets = {"tracking.uri": f"sqlite:///{tmp}/mlflow.db", "storage.path": str(tmp / "runs"),
            "registry.name": overrides["name"], **overrides}
    return load_spec(REPO / "jobs" / "quickstart.yaml", [f"{k}={v}" for k, v in sets.items()])


@pytest.fixture(scope="module")
def zero2_run(quickstart_run):
    """The session's quickstart run (conftest.py; test_registry uses it too): 60 steps, ZeRO-2."""
    return quickstart_run


def client_for(summary):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=summary.tracking_uri, registry_uri=summary.tracking_uri)


def test_run_is_tracked_with_metrics_params_artifacts_and_tags(zero2_run):
    spec, summary = zero2_run
    client = client_for(summary)
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["peft.r"] == "8" and run.data.params["quantization.bits"] == "4"
    assert run.data.tags["spec_hash"] == spec.spec_hash()
    assert run.data.tags["base_model"] == "builtin:tiny-llama"

    def steps(key):
        return [m.step for m in client.get_metric_history(summary.run_id, key)]

    assert steps("train_loss") == list(range(1, 61))
    for key in ("grad_norm", "learning_rate", "tokens_per_s", "step_time_s"):
        assert len(steps(key)) == 60
    assert sorted(steps("eval_loss")) == [0, 20, 40, 60]
    # The training workers ran at niceness 0, not Ray's 15 for its worker processes.
    assert [m.value for m in client.get_metric_history(summary.run_id, "worker_niceness")] == [0.0]

    artifacts = {a.path for a in client.list_artifacts(summary.run_id)}
    assert {"job.yaml", "deepspeed_config.json", "data_stats.json"} <= artifacts
    ds = client.download_artifacts(summary.run_id, "deepspeed_config.json")
    assert '"stage": 2' in open(ds).read()


def test_progress_shows_the_latest_loss_and_gradient_norm(zero2_run):
    """What the CLI's training bar shows (cli.common.BAR_METRICS): after the first steps, every
    update carries the latest known step's train_loss and grad_norm, and the last one equals the
    values MLflow logged for the last step."""
    from conftest import QUICKSTART_PROGRESS

    from orchestrator.cli.common import BAR_METRICS

    _, summary = zero2_run
    training = [(step, metrics) for task, step, _, metrics in QUICKSTART_PROGRESS if task == "training"]
    later = [metrics for step, metrics in training if step >= 20]
    assert later and all({"train_loss", "grad_norm"} <= metrics.keys() for metrics in later), training
    assert {"train_loss", "grad_norm", "eval_loss"} <= set(BAR_METRICS)
    client = client_for(summary)
    step, last = training[-1]
    assert step == 60
    for key in ("train_loss", "grad_norm"):
        [logged] = [m.value for m in client.get_metric_history(summary.run_id, key) if m.step == 60]
        assert last[key] == pytest.approx(logged, rel=1e-6), key


def test_fine_tuning_lowers_eval_loss(zero2_run):
    _, summary = zero2_run
    m = summary.metrics
    assert m["eval_loss"] < 0.75 * m["base_eval_loss"], m
    assert m["tokens_per_s"] > 0 and m["wall_s"] > 0


def test_adapter_is_registered_with_alias(zero2_run, tmp_path):
    spec, summary = zero2_run
    client = client_for(summary)
    reg = summary.registered_model
    version = client.get_model_version_by_alias(reg["name"], "candidate")
    assert str(version.version) == reg["version"] and version.run_id == summary.run_id
    assert reg["name"] == "e2e-zero2" and reg["uri"] == "models:/e2e-zero2@candidate"
    assert version.tags["mode"] == "adapter" and version.tags["spec_hash"] == spec.spec_hash()
    # Adapter only: the stored files hold the LoRA weights, not the base model's.
    from orchestrator.tracking.registry import download_model

    adapter = download_model(reg["uri"], tmp_path, summary.tracking_uri)
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "job.yaml"} <= names
    assert "model.safetensors" not in names


def test_a_local_run_starts_no_actor_it_does_not_use(zero2_run, ray_local):
    """Ray Train starts, at every run, an actor to hand out Ray Datasets (even with none given;
    launch._trainer_class leaves it out: the workers read their rows themselves) and one that
    watches the nodes for preemption (off on a local instance, one machine). Each is a process.
    Ray's state API lists the session's actors, the finished ones too."""
    from ray.util.state import list_actors

    names = {a.class_name for a in list_actors(limit=10_000, raise_on_missing_output=False)}
    assert "RayTrainWorker" in names and not names & {"DatasetManager", "PreemptionWatcher"}, names


def generate(summary, *variants: tuple[str, ...]) -> list[str]:
    """`orchestrator generate` of PROMPT by the run's registered model, once per variant of the
    command's extra options, the processes side by side."""
    procs = side_by_side([[sys.executable, "-m", "orchestrator", "generate", summary.registered_model["uri"], PROMPT,
                           "--tracking-uri", summary.tracking_uri, "--max-new-tokens", "48", *extra]
                          for extra in variants])
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return [proc.stdout.strip() for proc in procs]


def test_generate_answers_in_the_direction_of_the_training_data(zero2_run):
    _, summary = zero2_run
    tuned, base = generate(summary, (), ("--base",))
    assert tuned != base
    score = lambda text: sum(sentence in text for sentence in PATTERN)
    assert score(tuned) >= 3 > score(base), (tuned, base)


def test_a_run_without_eval_examples_is_never_evaluated(tmp_path, ray_local, tiny_base):
    """data.eval: null: the run trains and registers, and no evaluation runs: no eval loss in
    MLflow (before, NaN at every evaluation) nor in the summary."""
    from orchestrator.training.recipe import run_job

    spec = quickstart(tmp_path, name="e2e-no-eval", **{"data.eval": "null", "distributed.num_workers": 1,
                                                       "training.max_steps": 2, "training.eval_every": 1})
    summary = run_job(spec)
    client = client_for(summary)
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(summary.run_id, "train_loss")) == [1, 2]
    assert not [k for k in run.data.metrics if "eval" in k], sorted(run.data.metrics)
    assert summary.metrics["eval_loss"] is None and summary.metrics["base_eval_loss"] is None, summary.metrics
    assert summary.registered_model["version"] == "1"


def test_zero3_run_with_4bit_base_registers(tmp_path, ray_local, tiny_base):
    from orchestrator.training.recipe import run_job

    spec = quickstart(tmp_path, name="e2e-zero3", **{"distributed.deepspeed.stage": 3, "training.max_steps": 4,
                                                     "training.eval_every": 2, "training.checkpoint_every": 2})
    summary = run_job(spec)
    client = client_for(summary)
    assert client.get_run(summary.run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(summary.run_id, "eval_loss")) == [0, 2, 4]
    version = client.get_model_version_by_alias("e2e-zero3", "candidate")
    assert version.run_id == summary.run_id
    # checkpoint_every=2 of 4 steps: Ray Train persisted two adapter checkpoints to storage.path.
    saved = sorted((tmp_path / "runs").glob("**/adapter/adapter_model.safetensors"))
    assert len(saved) == 2, saved
    # The adapter gathered from the ZeRO-3 shards is whole and trained: every LoRA B matrix (zero at
    # initialisation) moved away from zero.
    from safetensors.torch import load_file

    for path in saved:
        tensors = load_file(str(path))
        lora_b = {k: t for k, t in tensors.items() if "lora_B" in k}
        assert lora_b and all(t.numel() > 0 for t in lora_b.values()), sorted(tensors)
        # (It once was all zeros at step 2: the first two steps trained at learning rate 0.)
        assert all(t.abs().sum() > 0 for t in lora_b.values()), f"{path}: a LoRA B matrix is all zero"
