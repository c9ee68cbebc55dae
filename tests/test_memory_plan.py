"""The memory planner: parameter counts, DeepSpeed's own estimators, quantized storage,
recommendations, and the `orchestrator plan` command."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys

import pytest
import yaml

from orchestrator.planning.architectures import architecture_for, architecture_from_config
from orchestrator.planning.budget import plan_for_run
from orchestrator.planning.catalogue import CATALOGUE
from orchestrator.planning.memory import memory_plan
from orchestrator.planning.parameters import count_params, lora_targets, quantized_bytes
from orchestrator.planning.units import GiB, parse_bytes
from orchestrator.spec import SpecError, parse_spec


def job(base="meta-llama/Llama-2-7b-hf", method="lora", bits=4, stage=2, world=1, **sections) -> dict:
    raw = {"name": "p", "model": {"base": base}, "quantization": {"bits": None if method == "full" else bits},
           "peft": {"method": method}, "data": {"train": "unused.jsonl"}, "training": {"max_steps": 1},
           "distributed": {"num_workers": world, "deepspeed": {"stage": stage}}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def plan(raw: dict, world: int = 1, gpu: int = 80 * GiB, **kw):
    spec = parse_spec(raw)
    return memory_plan(spec, architecture_for(spec), world_size=world, gpu_memory_bytes=gpu, **kw)


# --- parameter counts ---------------------------------------------------------------------------

PUBLISHED = {
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "meta-llama/Meta-Llama-3-8B": 8_030_261_248,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "meta-llama/Llama-2-13b-hf": 13_015_864_320,
    "meta-llama/Llama-2-70b-hf": 68_976_648_192,
    "meta-llama/Meta-Llama-3-70B": 70_553_706_496,
    "meta-llama/Llama-3.2-1B": 1_235_814_400,
    "Qwen/Qwen2.5-0.5B": 494_032_768,
    "Qwen/Qwen2.5-7B": 7_615_616_512,
    "Qwen/Qwen2.5-1.5B": 1_543_714_304,
    "Qwen/Qwen2.5-3B": 3_085_938_688,
    "Qwen/Qwen2.5-32B": 32_763_876_352,
    "Qwen/Qwen2.5-72B": 72_706_203_648,
    # Counted from transformers' meta-device build, not a formula (planning/inventory.py):
    "microsoft/Phi-3-mini-4k-instruct": 3_821_079_552,
    "google/gemma-2-9b": 9_241_705_984,  # tied embeddings counted once
    "mistralai/Mixtral-8x7B-v0.1": 46_702_792_704,  # 8 experts held, 2 run per token
    "tiiuae/falcon-7b": 6_921_720_704,
}


@pytest.mark.parametrize("hub_id,expected", PUBLISHED.items())
def test_published_parameter_counts(hub_id, expected):
    assert count_params(architecture_from_config(CATALOGUE[hub_id], hub_id)).total == expected


@pytest.mark.parametrize("hub_id", sorted(CATALOGUE))
def test_count_equals_transformers_on_meta(hub_id):
    """Build the catalogued config with transformers on the meta device (no memory) and count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(CATALOGUE[hub_id])
    hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    expected = sum(p.numel() for p in model.parameters())  # tied weights are one parameter
    assert count_params(architecture_from_config(CATALOGUE[hub_id], hub_id)).total == expected


@pytest.mark.parametrize("hub_id,targets", [
    *(("mistralai/Mistral-7B-v0.1", t) for t in ("all-linear", "attention", "mlp", ["q_proj", "v_proj"])),
    # fused expert weights (8 x 14336 x 4096 each), which peft reaches through target_parameters
    *(("mistralai/Mixtral-8x7B-v0.1", t) for t in ("all-linear", "mlp", ["q_proj", "down_proj"])),
])
def test_lora_count_and_targets_equal_peft(hub_id, targets):
    """r x (in + out) per targeted linear layer (r x experts x (in + out) per fused expert
    weight): what PEFT really creates, on the meta device."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from orchestrator.models.adapters import lora_config, resolve_target_modules

    # Mistral: grouped KV heads, so k/v projections are narrower
    spec = parse_spec(job(hub_id, peft={"r": 16, "target_modules": targets, "dropout": 0.0}))
    config = dict(CATALOGUE[hub_id])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    resolved = resolve_target_modules(targets, model)
    arch = architecture_for(spec)
    assert set(lora_targets(arch, targets)) == set(resolved)
    peft_model = get_peft_model(model, lora_config(spec, resolved, model))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert count_params(arch, spec).trainable == trainable


def test_unknown_target_module_names_the_choices():
    with pytest.raises(SpecError, match=r"peft.target_modules: the model has no linear module named c_attn"):
        plan(job(peft={"target_modules": ["c_attn"]}))


# --- DeepSpeed's own estimators ---------------------------------------------------------------------


def _estimator_gpu_bytes(fn, options: str, **kwargs) -> float:
    """Call a DeepSpeed `*_all_cold` estimator (it prints a table) and read one row's GPU figure.
    `options` as in that row, without spaces: "offload_param=cpu,offload_optimizer=none,zero_init=1"."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn(**kwargs)
    for line in out.getvalue().splitlines():
        cells = line.split("|")
        # The device prints as "cpu " or "OffloadDeviceEnum.cpu", depending on the Python version.
        if len(cells) == 3 and re.sub(r"OffloadDeviceEnum\.|\s", "", cells[2]) == options:
            return float(cells[1].strip().removesuffix("GB")) * 2**30
    raise AssertionError(f"no row {options!r} in:\n{out.getvalue()}")


def _largest_layer(arch) -> int:
    return arch.vocab_size * arch.hidden_size  # the embedding (or lm_head) matrix


@pytest.mark.parametrize("hub_id", ["meta-llama/Llama-2-7b-hf", "meta-llama/Meta-Llama-3-8B"])
@pytest.mark.parametrize("gpus", [1, 4, 8])
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_model_states_agree_with_deepspeed(hub_id, gpus, offload):
    """DeepSpeed: 2 B 16-bit weights whole + 18 B/param sharded (2 grad16 + 4 grad32 + 4 master
    + 8 Adam); with optimizer offload only the 16-bit weights stay on the GPU."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    p = plan(job(hub_id, "full", stage=2, world=gpus,
                 distributed={"deepspeed": {"stage": 2, "offload_optimizer": offload}}), world=gpus)
    ours = p.gpu("trainable") + p.gpu("gradients") + p.gpu("optimizer")
    theirs = _estimator_gpu_bytes(estimate_zero2_model_states_mem_needs_all_cold,
                                  f"offload_optimizer={'cpu' if offload else 'none'}",
                                  total_params=p.params.total, num_gpus_per_node=gpus, num_nodes=1)
    assert ours == pytest.approx(theirs, rel=0.05)


@pytest.mark.parametrize("hub_id", ["meta-llama/Llama-2-7b-hf", "meta-llama/Meta-Llama-3-8B"])
@pytest.mark.parametrize("gpus", [1, 4, 8])
@pytest.mark.parametrize("offload", ["none", "optimizer", "all"])
def test_zero3_model_states_agree_with_deepspeed(hub_id, gpus, offload):
    """DeepSpeed's ZeRO-3 estimator: 4 B x the largest layer (it gathered, with its gradient)
    + 18 B/param sharded. DeepSpeed 0.19 itself also keeps a 16-bit gradient partition
    (`grad_partitions_flat_buffer`, 2 B/param sharded; tests/test_memory_measured.py sees it),
    which that estimator leaves out: the plan counts it, and differs by exactly that."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    ds = {"stage": 3, "offload_optimizer": offload != "none", "offload_params": offload == "all"}
    p = plan(job(hub_id, "full", stage=3, world=gpus, distributed={"deepspeed": ds}), world=gpus)
    gathered = p.term("zero3_gathered_params") + p.term("zero3_gathered_grads")
    ours = p.gpu("trainable") + p.gpu("gradients") + p.gpu("optimizer") + gathered
    row = {"none": "offload_param=none,offload_optimizer=none,zero_init=1",
           "optimizer": "offload_param=none,offload_optimizer=cpu,zero_init=1",
           "all": "offload_param=cpu,offload_optimizer=cpu,zero_init=1"}[offload]
    theirs = _estimator_gpu_bytes(estimate_zero3_model_states_mem_needs_all_cold, row,
                                  total_params=p.params.total, largest_layer_params=_largest_layer(p.architecture),
                                  num_gpus_per_node=gpus, num_nodes=1)
    grad16 = p.term("grad16")  # 0 with optimizer offload: the partition then lives on the host
    assert ours - grad16 == pytest.approx(theirs, rel=0.05)
    assert grad16 == pytest.approx(2 * p.params.total / gpus, rel=0.01) or offload != "none"


def test_plan_follows_the_rule_of_thumb_for_full_fine_tuning():
    """Full fine-tuning in bf16 on one GPU: 2 + 2 + 4 + 4 + 8 = 20 B/param of model states."""
    p = plan(job("meta-llama/Llama-2-7b-hf", "full", stage=0))
    states = p.gpu("trainable") + p.gpu("gradients") + p.gpu("optimizer")
    assert states == 20 * p.params.total


# --- what each ZeRO stage shards -------------------------------------------------------------------


@pytest.mark.parametrize("stage,sharded", [
    (0, set()),
    (1, {"master", "adam", "grad32"}),  # ZeRO-1 converts only its own partition to fp32
    (2, {"master", "adam", "grad16", "grad32"}),
    (3, {"master", "adam", "grad16", "grad32", "trainable"}),
])
def test_each_stage_shards_its_part(stage, sharded):
    one = plan(job("meta-llama/Llama-2-7b-hf", "full", stage=stage), world=1)
    eight = plan(job("meta-llama/Llama-2-7b-hf", "full", stage=stage, world=8), world=8)
    for key in ("trainable", "grad16", "grad32", "master", "adam"):
        ratio = eight.term(key) / one.term(key)
        assert ratio == pytest.approx(1 / 8 if key in sharded else 1.0, rel=0.01), key


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_bucket_terms_follow_the_generated_deepspeed_config(method, stage, device):
    """The planned gradient buckets are the ones planning/deepspeed.py writes for the same job:
    ZeRO-1/2 keep two buckets with overlap_comm (on GPUs), ZeRO-3 one, stage 0 all-reduces in
    buckets of at most 5e8 elements; a LoRA adapter's buckets are its size, not DeepSpeed's 5e8."""
    from orchestrator.planning.deepspeed import deepspeed_config

    raw = job("meta-llama/Llama-2-7b-hf", method, stage=stage, world=2)
    p = plan(raw, world=2, device=device)
    cfg = deepspeed_config(parse_spec(raw), world_size=2, use_gpu=device == "cuda", total_steps=10,
                           trainable_params=p.params.trainable, largest_param=p.params.largest,
                           hidden_size=p.architecture.hidden_size)
    zero, e = cfg["zero_optimization"], 2  # bf16
    if stage in (1, 2):
        buffers = 2 if zero["overlap_comm"] else 1
        assert p.term("ipg_buckets") == buffers * zero["reduce_bucket_size"] * e
    elif stage == 3:
        assert p.term("ipg_buckets") == zero["reduce_bucket_size"] * e
        assert p.term("zero3_live") == zero["stage3_max_live_parameters"] * e
        assert zero["stage3_prefetch_bucket_size"] <= zero["stage3_max_live_parameters"]
    else:
        assert p.term("allreduce_bucket") == min(p.params.trainable, 500_000_000) * e
    if method == "lora" and stage:
        assert zero["reduce_bucket_size"] == p.params.trainable < 100_000_000


@pytest.mark.parametrize("cpus,offload,flagged", [(1, True, True), (8, True, False), (1, False, False)])
def test_optimizer_offload_on_one_cpu_is_flagged(cpus, offload, flagged):
    from orchestrator.planning.memory import OFFLOAD_ONE_CPU

    raw = job(stage=2, distributed={"cpus_per_worker": cpus, "deepspeed": {"stage": 2, "offload_optimizer": offload}})
    assert (OFFLOAD_ONE_CPU in plan(raw).assumptions) is flagged


@pytest.mark.parametrize("offload,on_host", [
    ({"offload_optimizer": True}, {"master", "adam", "grad16", "grad32"}),
    ({"offload_optimizer": True, "offload_params": True}, {"master", "adam", "grad16", "grad32"}),
])
def test_offload_moves_state_to_host(offload, on_host):
    p = plan(job("meta-llama/Meta-Llama-3-8B", "full", stage=3, world=8,
                 distributed={"deepspeed": {"stage": 3, **offload}}), world=8)
    for key in on_host:
        assert p.term(key) == 0 and p.term(key, where="cpu") > 0, key
    assert p.cpu_per_node_bytes == p.cpu_per_gpu_bytes * 8
    if offload.get("offload_params"):
        assert p.term("trainable_offloaded", where="cpu") > 0
        assert p.term("trainable") < 1e6  # only the small, persistent parameters stay whole


# --- quantized storage -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (352, 128)])
@pytest.mark.parametrize("bits,double_quant", [(4, True), (4, False), (8, False)])
def test_quantized_storage_equals_bitsandbytes(shape, bits, double_quant):
    """What bitsandbytes really stores: packed weights + absmax (+ nested absmax and code books)."""
    import torch
    from bitsandbytes.nn import Int8Params, Params4bit

    w = torch.randn(*shape, dtype=torch.bfloat16)
    if bits == 4:
        p = Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=double_quant)._quantize("cpu")
        tensors, stack = [], [p.quant_state]
        while stack:
            state = stack.pop()
            for value in vars(state).values():
                if torch.is_tensor(value):
                    tensors.append(value)
                elif value is not None and hasattr(value, "absmax"):
                    stack.append(value)
        constants = sum(t.numel() * t.element_size() for t in tensors)
    else:
        p = Int8Params(w, requires_grad=False)._quantize("cpu")
        constants = p.SCB.numel() * p.SCB.element_size()
    storage = p.numel() * p.element_size()
    assert quantized_bytes(shape[0] * shape[1], shape[0], bits, double_quant) == (storage, constants)


def test_qlora_weights_are_about_half_a_byte_per_parameter():
    p = plan(job("meta-llama/Llama-2-7b-hf", bits=4))
    quantized = p.term("frozen") + p.term("quant_constants")
    # 4-bit linears (0.5 B + 1/64 B absmax) and a bf16 embedding + lm_head (2 x 131M x 2 B).
    assert 3.8e9 < quantized < 4.1e9
    full = plan(job("meta-llama/Llama-2-7b-hf", "full", stage=0))

    def states(x):
        return sum(x.gpu(c) for c in ("weights", "trainable", "gradients", "optimizer"))

    assert states(p) < states(full) / 30  # ~4 GB against 20 B x 6.7B = 135 GB


# --- recommendations -----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw,gpu,world", [
    (job(bits=None, data={"train": "x", "max_seq_len": 2048}, training={"max_steps": 1, "micro_batch_size": 8}),
     24 * GiB, 1),
    (job("meta-llama/Meta-Llama-3-70B", "full", stage=2, world=8), 80 * GiB, 8),
    (job("meta-llama/Llama-2-13b-hf", bits=None, stage=0), 16 * GiB, 1),
])
def test_recommendations_fit_when_applied(raw, gpu, world):
    """Each recommendation, applied as its --set overrides, re-plans to the figure it states."""
    from orchestrator.spec import apply_overrides

    p = plan(raw, world=world, gpu=gpu)
    assert not p.fits and p.recommendations
    for rec in p.recommendations:
        changed = json.loads(json.dumps(raw))
        assert not apply_overrides(changed, list(rec.sets))
        again = plan(changed, world=rec.world_size, gpu=gpu)
        assert again.total_bytes == rec.total_bytes and again.fits == rec.fits
    assert any(r.fits for r in p.recommendations)


def test_a_plan_that_fits_has_no_recommendations():
    p = plan(job(), gpu=80 * GiB)
    assert p.fits and not p.recommendations


# --- architecture sources ---------------------------------------------------------------------------


def test_local_config_json(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=500, hidden_size=96, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True)
    config.save_pretrained(tmp_path)
    with torch.device("meta"):
        expected = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    arch = architecture_for(parse_spec(job(str(tmp_path))))
    assert count_params(arch).total == expected and arch.tie_word_embeddings


def test_builtin_model_is_read_without_building():
    from orchestrator.planning.catalogue import BUILTIN_MODELS

    recipe = BUILTIN_MODELS["tiny-llama"]
    arch = architecture_for(parse_spec(job("builtin:tiny-llama")))
    assert (arch.hidden_size, arch.num_layers) == (recipe.model_config["hidden_size"],
                                                   recipe.model_config["num_hidden_layers"])
    assert arch.vocab_size <= recipe.tokenizer_vocab_size


def test_any_architecture_plans_with_transformers_count(tmp_path):
    """gpt2 has no formula: its count is transformers' own (tied embeddings once, Conv1D weights
    quantized, the head not), and the plan names what it estimates."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257}
    (tmp_path / "config.json").write_text(json.dumps(config))
    arch = architecture_for(parse_spec(job(str(tmp_path))))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_embd=768, n_layer=12, n_head=12))
    assert count_params(arch).total == sum(p.numel() for p in model.parameters()) == 124_439_808
    quantized = [t.name for t in arch.tensors if t.quantizable]
    assert len(quantized) == 4 * 12 and "transformer.h.0.attn.c_attn.weight" in quantized
    result = plan(job(str(tmp_path)))
    assert any("estimated terms: activations of gpt2" in a for a in result.assumptions)


def test_unknown_model_type_is_a_clean_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not-a-model"}))
    with pytest.raises(SpecError, match=r"model.base: transformers cannot build the architecture 'not-a-model'"):
        architecture_for(parse_spec(job(str(tmp_path))))


def test_unknown_hub_id_offline_names_the_catalogue(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SpecError) as e:
        architecture_for(parse_spec(job("someone/unknown-model-7b")))
    assert "not in the planner's catalogue" in str(e.value) and "meta-llama/Llama-2-7b-hf" in str(e.value)


@pytest.mark.parametrize("local_gpu,budget,source", [
    (None, 80 * GiB, "no GPU here: assuming an 80 GiB GPU (pass --gpu-memory)"),
    ((24 * GiB, "NVIDIA L4"), 24 * GiB, "local GPU (NVIDIA L4)"),
])
def test_plan_for_run_says_which_gpu_it_planned_against(monkeypatch, local_gpu, budget, source):
    """Without --gpu-memory the plan is made against this machine's GPU, or with none an assumed
    80 GiB one, and says which; the verdict is against that budget. (The local GPU is what torch
    reports; here it is set, so both cases run on any machine.)"""
    from orchestrator.planning import budget as planning_budget

    monkeypatch.setattr(planning_budget, "local_gpu_memory", lambda: local_gpu)
    spec = parse_spec(job())
    spec.data.max_seq_len = 1024  # Llama-2-7B QLoRA: ~41 GiB per GPU, so the two budgets disagree
    p = plan_for_run(spec, world_size=2, gpu_memory_bytes=None)
    assert (p.gpu_memory_bytes, p.gpu_memory_source) == (budget, source)
    assert 24 * GiB < p.total_bytes < 80 * GiB
    assert p.fits is (budget == 80 * GiB)
    given = plan_for_run(spec, world_size=2, gpu_memory_bytes=40 * GiB)
    assert (given.gpu_memory_bytes, given.gpu_memory_source) == (40 * GiB, "given")
    # What `run` passes once the cluster's workers said their GPU's size (launch.cluster_gpu_memory).
    workers = plan_for_run(spec, world_size=2, gpu_memory_bytes=24 * GiB, source="the workers' GPU (NVIDIA L4)")
    assert (workers.gpu_memory_source, workers.fits) == ("the workers' GPU (NVIDIA L4)", False)


def test_a_cluster_without_gpus_has_no_workers_gpu_to_plan_against(ray_local):
    from orchestrator.training.launch import cluster_gpu_memory

    assert cluster_gpu_memory(timeout_s=5) is None


@pytest.mark.parametrize("text,expected", [
    ("80GiB", 80 * 2**30), ("80G", 80 * 2**30), ("40GB", 40 * 10**9), ("24 GiB", 24 * 2**30),
    ("81920MiB", 80 * 2**30), ("1.5TiB", int(1.5 * 2**40)), ("1024", 1024),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_full_fine_tuning_of_a_quantized_base_is_an_error():
    raw = job(method="full")
    raw["quantization"]["bits"] = 4
    with pytest.raises(SpecError, match=r"quantization.bits: full fine-tuning trains the base's own weights, which "
                                        r"cannot be trained 4-bit quantized. Fix: set quantization.bits=null"):
        parse_spec(raw)


def test_module_does_not_import_torch():
    code = "import sys, orchestrator.planning.memory, orchestrator.planning.budget; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the command ---------------------------------------------------------------------------------------


@pytest.fixture
def job_file(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"instruction": "x", "output": "y"}\n')

    def write(raw: dict):
        raw = json.loads(json.dumps(raw))
        raw["data"]["train"] = "train.jsonl"
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(raw))
        return str(path)

    return write


def _cli(*args):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def test_cli_json(job_file):
    r = _cli("plan", job_file(job()), "--json", "--gpu-memory", "80GiB", "--num-gpus", "2")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["params"] == {"total": 6_738_415_616, "trainable": 19_988_480}
    assert set(out["per_gpu"]) >= {"weights_bytes", "trainable_bytes", "gradients_bytes", "optimizer_bytes",
                                   "activations_bytes", "overhead_bytes", "total_bytes"}
    assert out["fits"] is True and out["world_size"] == 2 and "total_bytes" in out["per_node_cpu"]
    assert out["per_gpu"]["total_bytes"] == sum(v for k, v in out["per_gpu"].items()
                                                if k not in ("total_bytes", "allocated_bytes"))


def test_cli_does_not_fit_exits_1_with_recommendations(job_file):
    r = _cli("plan", job_file(job(bits=None)), "--set", "data.max_seq_len=4096", "--gpu-memory", "24GiB", "--json")
    assert r.exit_code == 1
    out = json.loads(r.stdout)
    assert out["fits"] is False
    assert out["recommendations"] and all({"change", "total_bytes"} <= set(x) for x in out["recommendations"])


def test_cli_explain_shows_the_rule_of_thumb(job_file):
    r = _cli("plan", job_file(job("meta-llama/Llama-2-7b-hf", "full", stage=0)), "--explain", "--gpu-memory", "80GB")
    assert r.exit_code == 1
    assert "rule of thumb" in r.stdout and "8 B Adam" in r.stdout and "does not fit" in r.stdout
    assert re.search(r"total\s.*~24 B/param", r.stdout)


@pytest.mark.parametrize("args,message", [
    (["--gpu-memory", "lots"], "--gpu-memory: not a memory size"),
    (["--set", "model.base=someone/unknown-7b"], "model.base: cannot read the architecture"),
    (["--set", "peft.target_modules=[q_proj, c_fc]"], "peft.target_modules: the model has no linear module named c_fc"),
    (["--set", "model.base=mistralai/Mixtral-8x7B-v0.1", "--set", "peft.target_modules=mlp", "--set", "peft.dropout=0.1"],
     "peft.dropout: 0.1 is not 0, and LoRA on the fused expert weights (experts.down_proj, experts.gate_up_proj) "
     "takes no dropout"),
    (["--set", "model.base=mistralai/Mixtral-8x7B-v0.1", "--set", "peft.method=ia3", "--set", "peft.target_modules=mlp"],
     "peft.target_modules: preset 'mlp' matches no linear module of this model (its experts are fused parameters"),
])
def test_cli_user_errors_exit_2(job_file, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = _cli("plan", job_file(job()), *args)
    assert r.exit_code == 2 and message in " ".join(r.output.split()) and "Traceback" not in r.output
