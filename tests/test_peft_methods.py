"""Every PEFT method on the tiny model, through the real path (Ray Train + DeepSpeed + MLflow):
it learns, it leaves the frozen weights alone, and what it registers reloads to the same model.
Plus the planner's trainable count against the live peft model, and `orchestrator compare`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from orchestrator.search.compare import preset_overrides
from orchestrator.spec import load_spec

from conftest import REPO, SAME_LENGTH_PROMPTS, serve_two_versions_gathered
from held_weights import assert_same_logits_as_deepspeed_held

# method -> (compare preset, extra overrides): the presets are what `orchestrator compare` runs.
METHODS = {
    "lora": ("dora", {"peft.use_rslora": True}),
    "ia3": ("ia3", {"quantization.bits": 8}),  # on an 8-bit base
    "prompt_tuning": ("prompt_tuning", {"peft.num_virtual_tokens": 8, "peft.init_text": "Describe the animal."}),
    "prefix_tuning": ("prefix_tuning", {"peft.num_virtual_tokens": 8}),
    # zero-initialised gates learn slowly at first: 10 steps need more than the preset's 3e-2
    "adaption_prompt": ("adaption_prompt", {"peft.adapter_len": 8, "peft.adapter_layers": 2,
                                            "training.learning_rate": 1e-1}),
    "freeze": ("freeze", {"peft.trainable_patterns": "[norm]", "peft.last_n_layers": 1}),
    "full": ("full", {}),
}
STEPS = 10
MODE = {"freeze": "changed-weights", "full": "full-model"}


def method_spec(tmp, store, method: str):
    """The method's job: its checkpoints under `tmp`, tracked and registered in `store`'s MLflow
    database."""
    preset, overrides = METHODS[method]
    sets = [*preset_overrides(preset, "pm"),
            *(f"{k}={v}" for k, v in {
                "name": f"pm-{method}", "registry.name": f"pm-{method}",
                "tracking.uri": f"sqlite:///{store}/mlflow.db",
                "storage.path": str(tmp / "runs"), "training.max_steps": STEPS, "training.eval_every": STEPS,
                "training.eval_batches": 2, "distributed.num_workers": 1, **overrides}.items())]
    return load_spec(REPO / "jobs" / "quickstart.yaml", sets)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_local, tiny_base):
    """method -> (spec, summary, its registered version downloaded): one short run per method,
    trained when first asked for, every method's registered in one MLflow store (so one replica
    can serve them together)."""
    from orchestrator.tracking.registry import download_model
    from orchestrator.training.recipe import run_job

    store = tmp_path_factory.mktemp("peft-methods")
    done: dict[str, tuple] = {}

    def run(method: str) -> tuple:
        if method not in done:
            tmp = store / method
            spec = method_spec(tmp, store, method)
            summary = run_job(spec)
            done[method] = (spec, summary, download_model(summary.registered_model["uri"], tmp / "registered",
                                                          summary.tracking_uri))
        return done[method]

    return run


@pytest.fixture(scope="module", params=list(METHODS))
def trained(request, runs):
    """(method, spec, summary, registered version downloaded) of each method's run."""
    return (request.param, *runs(request.param))


def test_each_method_learns(trained):
    method, spec, summary, _ = trained
    m = summary.metrics
    assert m["eval_loss"] < 0.95 * m["base_eval_loss"], (method, m)


def test_registered_artifact_holds_what_the_method_trained(trained):
    from mlflow import MlflowClient

    method, spec, summary, saved = trained
    client = MlflowClient(tracking_uri=summary.tracking_uri, registry_uri=summary.tracking_uri)
    version = client.get_model_version_by_alias(spec.registered_name, "candidate")
    assert version.tags["mode"] == MODE.get(method, "adapter")
    assert version.tags["peft_method"] == method
    names = {p.name for p in saved.iterdir()}
    if method == "full":
        assert "model.safetensors" in names
    elif method == "freeze":
        assert "trained_tensors.safetensors" in names and "model.safetensors" not in names
    else:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names and "model.safetensors" not in names


def test_frozen_weights_unchanged_and_reload_gives_the_trained_model(trained):
    """Reloaded from the registry (base + artifact): every parameter the method does not train
    equals the base's, some it trains changed from their initial values, the model scores the eval
    set as the trained model did at its last step, and it gives the same logits as the weights
    DeepSpeed held then."""
    import torch

    from orchestrator.data.tokenize import load_datasets
    from orchestrator.models.adapters import prepare_for_training
    from orchestrator.models.inference import complete, load_adapter
    from orchestrator.models.loading import load_base, resolve_base, torch_dtype
    from orchestrator.training.steps import evaluate
    from orchestrator.training.worker import seed_everything

    method, spec, summary, saved = trained
    loaded = load_adapter(saved)
    base_path = resolve_base(spec.model)
    # The model as the worker built it before its first step: the same seed before the same calls
    # (train_loop_per_worker seeds, then loads the base and adds the adapter), so a randomly
    # initialised adapter (LoRA's A, the prompts) starts here from the values it started from
    # there, and an adapter that never trained shows no change.
    seed_everything(spec.training.seed)
    reference = prepare_for_training(spec, load_base(spec, base_path), base_path)
    trainable = {n for n, p in reference.named_parameters() if p.requires_grad}
    before = dict(reference.named_parameters())
    after = dict(loaded.model.named_parameters())
    assert set(after) == set(before)
    frozen_changed = [n for n in set(before) - trainable if not torch.equal(before[n], after[n])]
    trained_changed = [n for n in trainable if not torch.equal(before[n], after[n])]
    assert not frozen_changed, frozen_changed[:5]
    assert trained_changed, f"no trainable parameter of {method} changed from its initial value"
    if method == "freeze":
        from safetensors.torch import load_file

        assert set(load_file(saved / "trained_tensors.safetensors")) == trainable

    data = load_datasets(spec.data, loaded.tokenizer, spec.training.seed)
    t = spec.training
    reloaded = evaluate(loaded.model, data.eval, t.micro_batch_size, loaded.tokenizer.pad_token_id, 0, 1,
                        torch.device("cpu"), t.eval_batches)
    # The run evaluated in the engine's compute dtype (the adapter's weights and products rounded to
    # it); the reloaded adapter runs in float32 (peft's autocast). The losses agree within the
    # compute dtype's eps (bf16: 0.78%; measured 0.1%, and 0.6% in test_production) beside the
    # summary's 4 decimals; a reload that lost the adapter scores at least 5% worse (each method learns).
    eps = torch.finfo(torch_dtype(spec.model.dtype)).eps
    assert reloaded == pytest.approx(summary.metrics["eval_loss"], rel=eps, abs=1e-4)
    assert isinstance(complete(loaded, "Describe the animal.\nA cat.", max_new_tokens=4), str)

    # The same logits as the trained model: the weights DeepSpeed held at the last step, put into
    # the freshly built model, against the registered version, on real eval batches.
    assert_same_logits_as_deepspeed_held(reference, loaded, summary, data.eval, t.micro_batch_size, batches=4,
                                         what=method)


def test_generate_cli_loads_the_registered_version(trained):
    """`orchestrator generate models:/NAME@alias` in a fresh process; one method not LoRA is
    enough here (every method's version is loaded in-process above, and by MLflow when logged)."""
    method, spec, summary, _ = trained
    if method != "prompt_tuning":
        pytest.skip("one fresh-process load is enough: each version loaded in-process above")
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "generate", summary.registered_model["uri"],
                           "Describe the animal.\nA cat.", "--tracking-uri", summary.tracking_uri,
                           "--max-new-tokens", "6"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()


def test_served_requests_share_a_batch_as_the_method_allows(trained):
    """Each method's registered version as `serve` holds it (ServedAdapters): three greedy requests
    gathered together run as one batch, except that a prompt or prefix tuning adapter's batch takes
    prompts of one length (padding would shift its positions): the two of one length together, the
    third alone. Each answer's batch size (the x-orchestrator-batch-size header) counts the
    requests generated with it."""
    from orchestrator.models.inference import prompt_ids
    from orchestrator.serving.adapters import PROMPT_LEARNING, ServedAdapters

    method, spec, summary, _ = trained
    ref = summary.registered_model["uri"]
    served = ServedAdapters([ref], summary.tracking_uri)
    served.load()
    prompts = [*SAME_LENGTH_PROMPTS, "Describe the animal.\nA small brown owl at the river."]
    name, loaded, _ = served._prompt(ref, prompts[0], None)
    lengths = [len(prompt_ids(loaded.tokenizer, served._prompt(ref, p, None)[2])) for p in prompts]
    assert lengths[0] == lengths[1] != lengths[2], lengths
    answers = served.complete_many([dict(ref=ref, prompt=p, max_tokens=6) for p in prompts])
    want = [2, 2, 1] if spec.peft.method in PROMPT_LEARNING else [3, 3, 3]
    assert [a.batch_size for a in answers] == want and all(a.text for a in answers), (method, answers)


def test_dora_versions_served_together_batch_per_version(trained):
    """peft refuses DoRA in a mixed-adapter batch ("Cannot pass `adapter_names` when DoRA is
    enabled"): requests gathered together to two DoRA versions (the lora method's run, on the dora
    preset, registered again as version 2) are completed in one batch per version, its answers
    the other version's (the same weights)."""
    method, spec, summary, _ = trained
    if not spec.peft.use_dora:
        pytest.skip("the lora method's run is the DoRA one (the dora preset)")
    _, answers = serve_two_versions_gathered(spec, summary, max_tokens=6)
    assert not [a for a in answers if isinstance(a, Exception)], answers
    assert [a.batch_size for a in answers] == [2, 2, 2, 2]
    # The versions hold the same weights, and each batch ran the same computation.
    assert [a.text for a in answers[:2]] == [a.text for a in answers[2:]] and all(a.text for a in answers), answers


def test_one_replica_serves_every_methods_version(runs):
    """Every method's registered version, all of one base, in one replica as `serve` holds them
    (ServedAdapters): a peft model per PEFT method (peft combines adapters of one type only:
    "Cannot combine adapters with different peft types"; the IA3 one on its 8-bit base), the
    freeze and full versions as models of their own. Requests to all of them gathered together
    are each completed in a batch of its version's own, as the version loaded alone (as
    `generate` loads it) completes the same batch; unloading a version drops its model."""
    from orchestrator.models.inference import complete_batch, format_prompt, load_adapter
    from orchestrator.serving.adapters import ServedAdapters, model_id

    versions = {method: runs(method) for method in METHODS}
    refs = [f"models:/{spec.registered_name}/1" for spec, _, _ in versions.values()]
    served = ServedAdapters(refs, versions["lora"][1].tracking_uri)
    assert served.load() == {ref: ref for ref in refs}
    assert len(served.shared) == 5 and sorted(served.whole) == ["pm-freeze/1", "pm-full/1"]
    # Each on the base as its job loads it: the IA3 version on bitsandbytes' 8-bit layers, the
    # (DoRA) LoRA version on the bf16 ones.
    layers = {method: {type(m).__name__ for m in served.model_of(f"pm-{method}/1").modules()}
              for method in ("ia3", "lora")}
    assert "Linear8bitLt" in layers["ia3"] and not {"Linear8bitLt", "Linear4bit"} & layers["lora"], layers
    answers = served.complete_many([dict(ref=ref, prompt=p, max_tokens=6) for ref in refs for p in SAME_LENGTH_PROMPTS])
    assert [a.batch_size for a in answers] == [2] * 2 * len(refs), answers
    for i, (method, (_, _, saved)) in enumerate(versions.items()):
        alone = load_adapter(saved)
        want = complete_batch(alone, [format_prompt(alone, p) for p in SAME_LENGTH_PROMPTS], 6)
        assert [a.text for a in answers[2 * i:2 * i + 2]] == want, method
    served.refs = [model_id(refs[0])]
    served.load()
    assert len(served.shared) == 1 and not served.whole and set(served.specs) == {"pm-lora/1"}


# --- the planner counts what peft builds ---------------------------------------------------------

COUNT_CASES = {
    "qlora": {}, "dora+rslora on 4-bit": {"peft.use_dora": True, "peft.use_rslora": True},
    "lora attention": {"peft.target_modules": "attention", "quantization.bits": "null"},
    "ia3 on 4-bit": {"peft.method": "ia3"},
    "lora on 8-bit": {"quantization.bits": 8},
    "ia3 k,down": {"peft.method": "ia3", "peft.target_modules": "[k_proj, down_proj]", "quantization.bits": "null"},
    "prompt_tuning": {"peft.method": "prompt_tuning", "peft.num_virtual_tokens": 8, "peft.init_text": "Describe"},
    "prefix_tuning": {"peft.method": "prefix_tuning", "peft.num_virtual_tokens": 8},
    "adaption_prompt": {"peft.method": "adaption_prompt", "peft.adapter_len": 6, "peft.adapter_layers": 2},
    "freeze": {"peft.method": "freeze", "peft.trainable_patterns": "[norm, lm_head]", "peft.last_n_layers": 1,
               "quantization.bits": "null"},
    "full": {"peft.method": "full", "quantization.bits": "null"},
}


@pytest.mark.parametrize("case", list(COUNT_CASES))
def test_planned_trainable_count_equals_the_live_model(case, tiny_base):
    from orchestrator.models.adapters import prepare_for_training
    from orchestrator.models.loading import load_base, resolve_base
    from orchestrator.planning.architectures import architecture_for
    from orchestrator.planning.parameters import count_params

    spec = load_spec(REPO / "jobs" / "quickstart.yaml", [f"{k}={v}" for k, v in COUNT_CASES[case].items()])
    path = resolve_base(spec.model)
    model = prepare_for_training(spec, load_base(spec, path), path)
    live = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count_params(architecture_for(spec), spec).trainable == live


def test_adaption_prompt_beyond_the_model_layers_is_a_spec_error(tiny_base):
    from orchestrator.planning.architectures import architecture_for
    from orchestrator.spec import SpecError

    spec = load_spec(REPO / "jobs" / "quickstart.yaml", ["peft.method=adaption_prompt", "peft.adapter_layers=7"])
    with pytest.raises(SpecError, match="peft.adapter_layers: 7 is more than the model's 3 layers"):
        architecture_for(spec)


# --- compare -------------------------------------------------------------------------------------


def test_compare_logs_parent_and_children_table_and_plot(tmp_path, ray_local, tiny_base):
    from mlflow import MlflowClient

    from orchestrator.search.compare import compare_methods

    sets = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"storage.path={tmp_path / 'runs'}",
            "training.max_steps=2", "training.eval_every=1", "training.eval_batches=1", "distributed.num_workers=1"]
    result = compare_methods(REPO / "jobs" / "quickstart.yaml", ["lora", "prompt_tuning"], sets,
                             out_dir=tmp_path / "out")
    assert [r.method for r in result.results] == ["lora", "prompt_tuning"]
    for r in result.results:
        assert not r.error and r.trainable_params > 0 and r.planned_peak_bytes > 0 and r.artifact_bytes > 0
        assert r.measured_peak_bytes > 0 and r.tokens_per_s > 0
        assert [s for s, _ in r.eval_history] == [0, 1, 2]
    assert result.results[1].trainable_params == 20 * 128  # 20 virtual tokens x hidden size 128

    client = MlflowClient(tracking_uri=result.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert sorted(c.data.tags["peft_method"] for c in children) == ["lora", "prompt_tuning"]
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"compare.csv", "compare.md", "compare.json", "eval_loss.png"} <= artifacts
    png = (tmp_path / "out" / "eval_loss.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert (tmp_path / "out" / "compare.md").read_text().count("\n") == 4  # header, rule, two methods
    assert not client.search_registered_models()  # compare registers nothing


def test_compare_unknown_method_is_a_user_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "compare", str(REPO / "jobs" / "quickstart.yaml"),
                           "--methods", "lora,lorax"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--methods: unknown method(s) lorax" in proc.stderr
