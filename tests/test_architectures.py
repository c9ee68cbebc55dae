"""Every decoder family transformers can build, not Llama alone: a tiny model of each family is
built from its config in this session (random weights, the built-in base's tokenizer), planned,
trained with QLoRA through the real path (Ray Train + DeepSpeed + MLflow), registered, reloaded
from the registry and asked to generate. Every family runs ZeRO-2 on one worker, a few steps; two
(a mixture of experts among them) run ZeRO-3 on two workers as well, three steps, checked for
what ZeRO-3 changes: that every targeted layer trained and the registered adapter holds it whole.

bitsandbytes' CPU 4-bit kernel cuts weights into 64-wide blocks along their input: every linear
layer's input width below is a multiple of 64 (hidden 64, MLP 128 or 256, heads x head_dim 64).
"""

from __future__ import annotations

import json
import shutil

import pytest

from orchestrator.spec import load_spec

from conftest import REPO, serve_two_versions_gathered
from held_weights import assert_same_logits_as_deepspeed_held

_SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 256}
_LLAMA_LIKE = {**_SMALL, "intermediate_size": 128, "num_key_value_heads": 2}

# family -> config; starcoder2 is in neither the matrix of families the planner was written
# against nor the catalogue.
FAMILIES = {
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256},
    "qwen2": {"model_type": "qwen2", **_LLAMA_LIKE, "tie_word_embeddings": True},
    "mistral": {"model_type": "mistral", **_LLAMA_LIKE},
    "phi3": {"model_type": "phi3", **_SMALL, "intermediate_size": 128, "num_key_value_heads": 4,
             "original_max_position_embeddings": 256},
    "gemma2": {"model_type": "gemma2", **_LLAMA_LIKE, "head_dim": 16, "query_pre_attn_scalar": 16},
    "gpt_neox": {"model_type": "gpt_neox", **_SMALL, "intermediate_size": 256},
    "falcon": {"model_type": "falcon", **_SMALL, "new_decoder_architecture": True, "num_kv_heads": 2,
               "alibi": False},
    "mixtral": {"model_type": "mixtral", **_LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2},
    "starcoder2": {"model_type": "starcoder2", **_LLAMA_LIKE, "intermediate_size": 256},
}
# Also trained under ZeRO-3 (4-bit weights stored in bf16 so DeepSpeed can shard them), with
# the mixture of experts, whose LoRA on the fused expert weights goes through peft's target_parameters,
# and Gemma-2 (eager attention, soft-capping, tied embeddings). A Llama-shaped model (Mistral's
# layout) is trained under ZeRO-3 by tests/test_end_to_end.py; a third run here would repeat it.
ZERO3_FAMILIES = ("gemma2", "mixtral")
STEPS = 4


def build_family(family: str, tiny_base, folder):
    """A tiny random model of `family` saved as a local model directory with the tiny base's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from orchestrator.planning.inventory import build_config

    tokens = json.loads((tiny_base / "config.json").read_text())
    ids = {k: tokens[k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
    config = build_config({**FAMILIES[family], **ids})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_base / name, folder / name)
    return folder


def family_spec(tmp, family: str, base, stage: int = 2, steps: int = STEPS, extra: tuple[str, ...] = ()):
    sets = {"name": f"arch-{family}", "model.base": str(base), "registry.name": f"arch-{family.replace('_', '-')}",
            "tracking.uri": f"sqlite:///{tmp}/mlflow.db", "storage.path": str(tmp / "runs"),
            "training.max_steps": steps, "training.eval_every": steps, "training.eval_batches": 1,
            "training.learning_rate": 1e-2, "training.warmup_ratio": 0, "training.generations": 0,
            # ZeRO-3 shards over 2 workers; a ZeRO-2 run checks the family, not the sharding
            # (the quickstart's runs train on 2): one worker starts some 4 s sooner on 2 cores.
            "distributed.num_workers": 2 if stage == 3 else 1, "distributed.deepspeed.stage": stage}
    return load_spec(REPO / "jobs" / "quickstart.yaml", [f"{k}={v}" for k, v in sets.items()] + list(extra))


@pytest.fixture(scope="module")
def family_base(tmp_path_factory, tiny_base):
    """family -> its tiny model directory, built once for the module (the ZeRO-2 and ZeRO-3 runs share it)."""
    bases = {}

    def base(family: str):
        if family not in bases:
            bases[family] = build_family(family, tiny_base, tmp_path_factory.mktemp(f"{family}-base"))
        return bases[family]

    return base


def train_and_download(tmp, spec):
    """One run through the real path, registered, and its registered version downloaded."""
    from orchestrator.tracking.registry import download_model
    from orchestrator.training.recipe import run_job

    summary = run_job(spec)
    return summary, download_model(summary.registered_model["uri"], tmp / "registered", summary.tracking_uri)


@pytest.fixture(scope="module", params=list(FAMILIES))
def trained(request, tmp_path_factory, ray_local, family_base):
    """One short ZeRO-2 QLoRA run per family, registered, and its registered version downloaded."""
    family = request.param
    tmp = tmp_path_factory.mktemp(family)
    spec = family_spec(tmp, family, family_base(family))
    return (family, spec, *train_and_download(tmp, spec))


def test_planned_counts_equal_the_live_model(trained):
    """The plan's parameter count is transformers' own (tied embeddings once), and its trainable
    count is what peft builds on the 4-bit model, with the same targets the loader resolves."""
    from orchestrator.models.adapters import prepare_for_training
    from orchestrator.models.loading import load_base
    from orchestrator.planning.architectures import architecture_for
    from orchestrator.planning.parameters import count_params

    family, spec, _, _ = trained
    arch = architecture_for(spec)
    plain = load_base(spec, spec.model.base, quantize=False)
    assert count_params(arch).total == sum(p.numel() for p in plain.parameters()), family
    live = prepare_for_training(spec, load_base(spec, spec.model.base), spec.model.base)
    assert count_params(arch, spec).trainable == sum(p.numel() for p in live.parameters() if p.requires_grad)
    if arch.counted:  # no formula of its own: the plan says what it estimates
        assert arch.estimated and f"estimated terms: activations of {arch.model_type}" in " ".join(
            memory_assumptions(spec, arch))


def memory_assumptions(spec, arch):
    from orchestrator.planning.memory import memory_plan

    return memory_plan(spec, arch, world_size=2, gpu_memory_bytes=80 * 2**30).assumptions


def test_each_family_learns_and_registers(trained):
    family, spec, summary, saved = trained
    m = summary.metrics
    assert m["eval_loss"] < m["base_eval_loss"], (family, m)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in saved.iterdir()}


def test_registered_adapter_reloads_to_the_trained_model_and_generates(trained):
    """Reloaded from the registry onto the 4-bit base: it scores the eval batch as the trained
    model did at its last step, gives the logits of the LoRA weights DeepSpeed held then (put
    into a freshly wrapped 4-bit base), and it generates."""
    import torch

    from orchestrator.data.tokenize import load_datasets
    from orchestrator.models.adapters import prepare_for_training
    from orchestrator.models.inference import complete, load_adapter
    from orchestrator.models.loading import load_base
    from orchestrator.training.steps import evaluate

    family, spec, summary, saved = trained
    loaded = load_adapter(saved)
    data = load_datasets(spec.data, loaded.tokenizer, spec.training.seed)
    t = spec.training
    # The workers scored eval_batches each: in one process, the same first batches of the set.
    reloaded = evaluate(loaded.model, data.eval, t.micro_batch_size, loaded.tokenizer.pad_token_id, 0, 1,
                        torch.device("cpu"), t.eval_batches * spec.distributed.num_workers)
    assert reloaded == pytest.approx(summary.metrics["eval_loss"], rel=1e-3, abs=1e-3), family
    assert isinstance(complete(loaded, "Describe the animal.\nA cat.", max_new_tokens=4), str)
    reference = prepare_for_training(spec, load_base(spec, spec.model.base), spec.model.base)
    assert_same_logits_as_deepspeed_held(reference, loaded, summary, data.eval, t.micro_batch_size, what=family)


@pytest.fixture(scope="module", params=ZERO3_FAMILIES)
def trained_zero3(request, tmp_path_factory, ray_local, family_base):
    """Three ZeRO-3 QLoRA steps per family (DeepSpeed's one-step warm-up gives the first two
    learning rate 0), registered, and the registered version downloaded."""
    family = request.param
    tmp = tmp_path_factory.mktemp(f"{family}-zero3")
    spec = family_spec(tmp, family, family_base(family), stage=3, steps=3)
    return (family, spec, *train_and_download(tmp, spec))


def test_zero3_trains_every_targeted_layer_and_registers_it_whole(trained_zero3):
    """Under ZeRO-3 each worker holds a shard of every weight: the registered adapter holds every
    LoRA tensor peft builds for the job, each whole (gathered), and every B moved from its zero
    start (each targeted layer, Mixtral's fused experts included, got a gradient)."""
    from safetensors.torch import load_file

    from orchestrator.models.adapters import prepare_for_training
    from orchestrator.models.loading import load_base

    family, spec, summary, saved = trained_zero3
    live = prepare_for_training(spec, load_base(spec, spec.model.base), spec.model.base)
    expected = {n.replace(".default", ""): tuple(p.shape) for n, p in live.named_parameters() if p.requires_grad}
    registered = load_file(saved / "adapter_model.safetensors")
    assert {n: tuple(t.shape) for n, t in registered.items()} == expected, family
    untrained = [n for n, t in registered.items() if ".lora_B." in n and not t.abs().sum()]
    assert not untrained, (family, untrained[:3])
    if family == "mixtral":
        assert any(".mlp.experts." in n for n in registered), sorted(registered)[:4]
    assert summary.planned["trainable_params"] == sum(t.numel() for t in registered.values())


def test_lora_on_fused_experts_is_served_in_batches_per_version(trained_zero3):
    """peft cannot put a LoRA on a mixture of experts' fused expert weights (its target_parameters)
    in a mixed-adapter batch ("does not support mixed adapter batches yet"): requests gathered
    together to two such versions (the Mixtral run registered again as version 2) are completed
    in one batch per version, its answers the other version's (the same weights)."""
    family, spec, summary, _ = trained_zero3
    if family != "mixtral":
        pytest.skip("the mixture of experts: Mixtral")
    served, answers = serve_two_versions_gathered(spec, summary, max_tokens=4)
    assert served.model_of(f"{spec.registered_name}/1").peft_config[f"{spec.registered_name}/1"].target_parameters
    assert not [a for a in answers if isinstance(a, Exception)], answers
    assert [a.batch_size for a in answers] == [2, 2, 2, 2]
    # The versions hold the same weights, and each batch ran the same computation.
    assert [a.text for a in answers[:2]] == [a.text for a in answers[2:]], answers


# --- target presets per family (meta device, no training) -------------------------------------------

PRESETS = {  # family -> (attention, mlp) as the presets resolve
    "gpt2": (["attn.c_attn", "attn.c_proj"], ["mlp.c_fc", "mlp.c_proj"]),
    "phi3": (["self_attn.o_proj", "self_attn.qkv_proj"], ["mlp.down_proj", "mlp.gate_up_proj"]),
    "gpt_neox": (["attention.dense", "attention.query_key_value"], ["mlp.dense_4h_to_h", "mlp.dense_h_to_4h"]),
    "falcon": (["self_attention.dense", "self_attention.query_key_value"],
               ["mlp.dense_4h_to_h", "mlp.dense_h_to_4h"]),
    # the fused expert weights (3-D parameters, through peft's target_parameters), never the router mlp.gate
    "mixtral": (["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"],
                ["experts.down_proj", "experts.gate_up_proj"]),
    "gemma2": (["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"],
               ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]),
}


def _meta_model(family: str):
    import torch
    from transformers import AutoModelForCausalLM

    from orchestrator.planning.inventory import build_config

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(build_config(FAMILIES[family]))


def _wrapped(model, targets) -> set[str]:
    """What peft really wraps with LoRA for `targets` (a list, or peft's own "all-linear"): module
    paths, and parameter paths for the fused expert weights it reaches through target_parameters."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    from orchestrator.models.adapters import fused_expert_names
    from orchestrator.planning.targets import split_targets

    modules, parameters = (targets, []) if targets == "all-linear" else split_targets(targets, fused_expert_names(model))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=modules, target_parameters=parameters or None))
    return {n.removeprefix("base_model.model.").replace(".base_layer", "")
            + (f".{m.parameter_name}" if isinstance(m, ParamWrapper) else "")
            for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_presets_are_disjoint_and_all_linear_is_peft_own(family):
    """attention and mlp wrap disjoint layers, all-linear both; all-linear wraps what peft's own
    all-linear does (every linear layer but the output head, lm_head or embed_out; a mixture of
    experts' fused expert weights), except the router of a mixture of experts (Mixtral's
    `mlp.gate`), which peft's own also trains and ours never does."""
    from orchestrator.models.adapters import resolve_target_modules

    model = _meta_model(family)
    wrapped = {}
    for preset in ("attention", "mlp", "all-linear"):
        targets = resolve_target_modules(preset, model)
        if preset != "all-linear" and family in PRESETS:
            assert targets == PRESETS[family][preset == "mlp"], (family, preset, targets)
        wrapped[preset] = _wrapped(_meta_model(family), targets)
    assert wrapped["attention"] and wrapped["mlp"] and not wrapped["attention"] & wrapped["mlp"]
    assert wrapped["all-linear"] == wrapped["attention"] | wrapped["mlp"]
    peft_own = _wrapped(_meta_model(family), "all-linear")
    routers = {n for n in peft_own if n.endswith(ROUTERS)}
    assert bool(routers) == (family == "mixtral") and wrapped["all-linear"] == peft_own - routers
    assert not any(n.endswith(("lm_head", "embed_out", *ROUTERS)) for n in wrapped["all-linear"])


ROUTERS = ("mlp.gate", "mlp.gate.weight")  # Mixtral's router, as a module or (peft 0.21) its weight


@pytest.mark.parametrize("family", list(FAMILIES))
def test_planner_resolves_presets_as_the_loader(family):
    from orchestrator.models.adapters import resolve_target_modules
    from orchestrator.planning.architectures import architecture_from_config
    from orchestrator.planning.parameters import lora_targets

    arch = architecture_from_config({"vocab_size": 32064, **FAMILIES[family]}, family)
    assert list(lora_targets(arch, "all-linear")) == resolve_target_modules("all-linear", _meta_model(family))


def test_attention_kernel_auto_follows_the_architecture(tmp_path, family_base):
    """`model.attn_implementation: auto` (the default) loads Gemma-2, which has no sdpa path, with
    eager and a Llama-like family with sdpa; `sdpa` asked of Gemma-2 is refused naming the field."""
    from orchestrator.models.loading import load_base
    from orchestrator.spec import SpecError

    for family, kernel in (("gemma2", "eager"), ("mistral", "sdpa")):
        spec = family_spec(tmp_path, family, family_base(family))
        assert spec.model.attn_implementation == "auto"
        assert load_base(spec, str(spec.model.base)).config._attn_implementation == kernel
    gemma = family_spec(tmp_path, "gemma2", family_base("gemma2"))
    asked = gemma.model_copy(update={"model": gemma.model.model_copy(update={"attn_implementation": "sdpa"})})
    with pytest.raises(SpecError, match="model.attn_implementation: sdpa is not supported") as refused:
        load_base(asked, str(gemma.model.base))
    assert "auto" in refused.value.problems[0].fix


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_runs_its_output_layer_on_the_trained_positions_only(tmp_path, family_base, family):
    """The worker's loss (`TrainedPositionsLoss`) holds for every family: its output layer sees one
    row per trained position and the loss is the model's own, on the LoRA model the worker
    trains (fp32 here, so that the two agree to fp32 rounding). A mixture of experts asked for its
    router loss trains on the model's own loss, which adds it."""
    import torch

    from orchestrator.data.records import Example
    from orchestrator.data.tokenize import collate
    from orchestrator.models.adapters import prepare_for_training
    from orchestrator.models.loading import load_base
    from orchestrator.training.steps import TrainedPositionsLoss

    spec = family_spec(tmp_path, family, family_base(family), extra=("quantization.bits=null", "model.dtype=float32"))
    model = prepare_for_training(spec, load_base(spec, str(spec.model.base)), str(spec.model.base))
    examples = [Example(input_ids=list(range(20, 20 + n)), labels=[-100] * p + list(range(20 + p, 20 + n)))
                for p, n in ((6, 30), (9, 14))]
    batch = collate(examples, 0)
    rows = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1]))
    torch.manual_seed(0)
    want = model(**batch).loss
    loss_of = TrainedPositionsLoss(model)
    torch.manual_seed(0)
    got = loss_of(model, batch, torch.device("cpu"))
    assert loss_of.enabled and tuple(rows[-1]) == (24 + 5,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if family == "mixtral":  # its router loss is added to the loss only by the model, given labels
        loss_of.close()
        model.config.output_router_logits = True
        routed = TrainedPositionsLoss(model)
        torch.manual_seed(0)
        with_router = model(**batch).loss
        torch.manual_seed(0)
        torch.testing.assert_close(routed(model, batch, torch.device("cpu")), with_router)
        assert tuple(rows[-1]) == (2, 30) and abs(with_router.item() - got.item()) > 1e-5  # every position
