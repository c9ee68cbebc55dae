"""The memory plan against what live tensors hold, on the CPU.

Tiny Llama models built from a config in the test; real DeepSpeed engines (ZeRO-0 on one rank,
ZeRO-2 and ZeRO-3 on two gloo ranks) built the way the worker loop builds them. Parameter, gradient and
optimizer bytes must match exactly; activations within 25% of a measured forward + backward.
"""

from __future__ import annotations

import pytest

from memory_probe import (measure_activations, measure_eval_peak, peak_process_memory as run_peak, run_deepspeed_cases,
                          zero3_loaded_weights)
from orchestrator.planning.architectures import architecture_for
from orchestrator.planning.memory import EVAL_LOSS_CHUNK_TOKENS, memory_plan
from orchestrator.spec import parse_spec

pytestmark = pytest.mark.integration

# hidden 256 and an MLP of 1664 make the MLP weights larger than ZeRO-3's persistence threshold
# (1e5 elements) even when packed 4 to a bf16 element, while the attention weights stay below it:
# both kinds of ZeRO-3 parameter are exercised.
TINY = dict(vocab_size=1024, hidden_size=256, intermediate_size=1664, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=False)


def saved_llama(tmp_path_factory, name: str, config: dict) -> str:
    """A Llama of `config` in bf16, built and saved in the test session."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(name)
    LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return saved_llama(tmp_path_factory, "tiny-llama", TINY)


def job(base: str, method="lora", bits=None, stage=0, world=1, gc=False, dropout=0.0, targets="all-linear",
        micro=2, seq=64) -> dict:
    return {"name": "probe", "model": {"base": base, "gradient_checkpointing": gc},
            "quantization": {"bits": bits}, "peft": {"method": method, "r": 8, "dropout": dropout,
                                                      "target_modules": targets},
            "data": {"train": "unused.jsonl", "max_seq_len": seq},
            "training": {"max_steps": 10, "micro_batch_size": micro},
            "distributed": {"num_workers": world, "deepspeed": {"stage": stage}}}


# name: (method, bits, ZeRO stage, world size, gradient checkpointing). One process runs the
# single-rank cases, one pair of gloo ranks the others.
CASES = {
    "lora-bf16-z0": ("lora", None, 0, 1, False),
    "qlora-4bit-z0-gc": ("lora", 4, 0, 1, True),
    "full-z0": ("full", None, 0, 1, False),
    "lora-bf16-z3": ("lora", None, 3, 2, False),
    "qlora-4bit-z3": ("lora", 4, 3, 2, True),
    "full-z3-gc": ("full", None, 3, 2, True),
    "qlora-4bit-z2": ("lora", 4, 2, 2, False),
    "full-z2": ("full", None, 2, 2, False),
}


@pytest.fixture(scope="module")
def deepspeed_results(tiny_model_dir, tmp_path_factory):
    results = {}
    for world in sorted({w for *_, w, _ in CASES.values()}):
        cases = [{"name": name, "spec": parse_spec(job(tiny_model_dir, m, bits, stage, w, gc)).model_dump()}
                 for name, (m, bits, stage, w, gc) in CASES.items() if w == world]
        out = tmp_path_factory.mktemp(f"ranks{world}")
        for r in run_deepspeed_cases(cases, world, str(out)):
            results[(r["name"], r["rank"])] = r
    return results


@pytest.mark.parametrize("name", CASES)
def test_model_states_match_live_tensors(name, deepspeed_results, tiny_model_dir):
    method, bits, stage, world, gc = CASES[name]
    spec = parse_spec(job(tiny_model_dir, method, bits, stage, world, gc))
    plan = memory_plan(spec, architecture_for(spec), world_size=world, gpu_memory_bytes=2**40, device="cpu")
    for rank in range(world):
        live = deepspeed_results[(name, rank)]
        measured = {"weights": live["weights"], "trainable": live["trainable"],
                    "gradients": live["grad16"] + live["grad32"],
                    "optimizer": live["master"] + live["moments"]}
        planned = {k: plan.gpu(k) for k in measured}
        assert planned == measured, f"{name} rank {rank}: planned {planned} != live {measured}"

        # Nothing else is held: every storage the engine reaches after a step is one of the above
        # (ZeRO-3 also keeps its 16-bit gradient buffer and its gradient bucket between steps, the
        # size planning/deepspeed.py gave it: the plan's ipg_buckets term),
        # give or take scalars such as Adam's step counts.
        between_steps = (live["weights"] - live["constants"] + live["trainable"] + live["master"]
                         + live["moments"] + (live["grad16"] + plan.term("ipg_buckets") if stage == 3 else 0))
        assert 0 <= live["reachable_after_step"] - between_steps <= 1024, (name, live, between_steps)


ACTIVATION_CASES = [
    # method, bits, gradient checkpointing, LoRA dropout, targets, micro batch, sequence length
    ("full", None, False, 0.0, "all-linear", 2, 64),
    ("full", None, True, 0.0, "all-linear", 2, 64),
    ("lora", None, False, 0.0, "all-linear", 2, 64),
    ("lora", None, True, 0.0, "all-linear", 2, 64),
    ("lora", None, False, 0.1, "all-linear", 4, 32),
    ("lora", None, False, 0.0, "attention", 2, 64),
    ("lora", None, True, 0.1, "mlp", 2, 64),
    ("lora", 4, False, 0.0, "all-linear", 2, 64),
    ("lora", 4, True, 0.0, "all-linear", 1, 128),
]


@pytest.mark.parametrize("method,bits,gc,dropout,targets,micro,seq", ACTIVATION_CASES)
def test_activations_within_25_percent(tiny_model_dir, method, bits, gc, dropout, targets, micro, seq):
    spec = parse_spec(job(tiny_model_dir, method, bits, gc=gc, dropout=dropout, targets=targets,
                          micro=micro, seq=seq))
    assert_activations_as_planned(spec, TINY["vocab_size"])


# A mixture of experts whose fused expert weights LoRA targets (peft's target_parameters): the
# weight plus its update is materialized in every forward and kept for backward.
TINY_MOE = dict(model_type="mixtral", vocab_size=1001, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                max_position_embeddings=256)


def test_fused_expert_lora_activations_within_25_percent(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from orchestrator.planning.inventory import build_config

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(build_config(TINY_MOE)).to(torch.bfloat16).save_pretrained(tmp_path)
    spec = parse_spec(job(str(tmp_path)))
    assert spec.peft.target_modules == "all-linear"  # the experts included
    assert_activations_as_planned(spec, TINY_MOE["vocab_size"])


def assert_activations_as_planned(spec, vocab_size: int) -> None:
    """One forward + backward of the job's model on a padded random batch: the plan's peak (and,
    without checkpointing, its saved bytes) within 25% of what the tensors hold."""
    import torch

    from orchestrator.models.adapters import prepare_for_training
    from orchestrator.models.loading import load_base

    micro, seq, gc = spec.training.micro_batch_size, spec.data.max_seq_len, spec.model.gradient_checkpointing
    torch.manual_seed(0)
    model = load_base(spec, spec.model.base)
    model.config.use_cache = False
    model = prepare_for_training(spec, model)
    for p in model.parameters():  # DeepSpeed casts the (fp32) LoRA weights to the model dtype
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    model.train()
    ids = torch.randint(0, vocab_size, (micro, seq))
    mask = torch.ones_like(ids)
    mask[-1, seq - seq // 4:] = 0  # padding, as real batches have: attention gets a 4D mask
    saved, peak = measure_activations(model, {"input_ids": ids, "attention_mask": mask, "labels": ids})

    planned = memory_plan(spec, architecture_for(spec), world_size=1, gpu_memory_bytes=2**40,
                          device="cpu").activations
    assert planned.peak == pytest.approx(peak, rel=0.25), f"peak: planned {planned.peak}, measured {peak}"
    if not gc:  # with checkpointing, the layer inputs are held by checkpoint frames, not saved tensors
        assert planned.saved == pytest.approx(saved, rel=0.25), f"saved: planned {planned.saved}, measured {saved}"


# The evaluation's peak is the logits plus one fp32 loss chunk when the vocabulary is wide, a
# decoder layer's MLP when it is narrow: both kinds of case, and micro batches of fewer and of more
# tokens than one chunk (EVAL_LOSS_CHUNK_TOKENS).
WIDE_VOCAB = dict(TINY, vocab_size=16384, hidden_size=128, intermediate_size=384)

EVAL_CASES = [
    # config, method, LoRA targets, micro batch, sequence length
    ("tiny", "lora", "all-linear", 2, 64),
    ("tiny", "lora", "attention", 8, 256),
    ("wide", "lora", "all-linear", 2, 64),
    ("wide", "lora", "all-linear", 8, 256),
    ("wide", "full", "all-linear", 4, 128),
]


@pytest.fixture(scope="module")
def wide_vocab_dir(tmp_path_factory):
    return saved_llama(tmp_path_factory, "wide-vocab-llama", WIDE_VOCAB)


@pytest.mark.parametrize("config,method,targets,micro,seq", EVAL_CASES)
def test_evaluation_peak_within_25_percent(tiny_model_dir, wide_vocab_dir, config, method, targets, micro, seq):
    """The plan's evaluation term against one evaluation batch measured on the CPU: the model's
    logits, then the chunked fp32 cross-entropy (memory_probe.chunked_eval_loss)."""
    import torch

    from orchestrator.models.adapters import prepare_for_training
    from orchestrator.models.loading import load_base

    base = tiny_model_dir if config == "tiny" else wide_vocab_dir
    spec = parse_spec(job(base, method, targets=targets, micro=micro, seq=seq))
    torch.manual_seed(0)
    model = prepare_for_training(spec, load_base(spec, base))
    for p in model.parameters():  # DeepSpeed casts the (fp32) LoRA weights to the model dtype
        p.data = p.data.to(torch.bfloat16)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (micro, seq))
    mask = torch.ones_like(ids)
    mask[-1, seq - seq // 4:] = 0
    measured = measure_eval_peak(model, {"input_ids": ids, "attention_mask": mask, "labels": ids},
                                 EVAL_LOSS_CHUNK_TOKENS)
    plan = memory_plan(spec, architecture_for(spec), world_size=1, gpu_memory_bytes=2**40, device="cpu")
    assert plan.activations.eval_peak == pytest.approx(measured, rel=0.25), \
        f"planned {plan.activations.eval_peak:,} B, measured {measured:,} B"
    # The plan reserves the larger of training's and evaluation's peaks.
    assert plan.gpu("activations") == max(plan.activations.peak, plan.activations.eval_peak)


# --- ZeRO-3 never holds the whole model on one worker ---------------------------------------------

def test_zero3_load_puts_the_files_weights_in_the_partitions(tmp_path_factory):
    """Each rank reads its own slice of every weight: gathered back, every parameter equals the
    file's tensor, on 3 ranks, where most weights do not split evenly (the last slice is padded)."""
    base = saved_llama(tmp_path_factory, "odd-llama", dict(TINY, vocab_size=1001, hidden_size=64, intermediate_size=100,
                                                           num_attention_heads=4, num_key_value_heads=2))
    out = tmp_path_factory.mktemp("zero3-weights")
    for r in zero3_loaded_weights(parse_spec(job(base, stage=3, world=3)).model_dump(), 3, str(out)):
        assert r["partitioned"] == r["params"] > 0 and r["differ"] == [], r


# ~154M parameters: 11 layers of hidden 1024 / MLP 2816 and a small vocabulary, so no single tensor
# (the largest, the embedding and the output head, 8.4M elements each; an MLP matrix 2.9M) weighs much
# next to the model (308 MB in bf16).
MID = dict(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=11,
           num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def mid_model_dir(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mid-llama")
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**MID, dtype="bfloat16"))
    model = model.to_empty(device="cpu")
    for p in model.parameters():  # weights need only be real bytes, not a good initialisation
        p.data.normal_(0, 0.02)
    model.save_pretrained(path)
    return str(path)


# Steps each worker takes in the ZeRO-3 / ZeRO-2 comparison: DeepSpeed records the order of the
# modules during the first step and uses it from the second on (prefetch, keeping weights gathered
# for reuse), so the third step is the steady state.
STEADY_STEPS = 3


@pytest.fixture(scope="module")
def zero_stage_peaks(mid_model_dir, tmp_path_factory) -> dict:
    """Each rank's memory over load + engine + STEADY_STEPS steps, ZeRO-2 and ZeRO-3, 2 gloo ranks."""
    peaks = {}
    for stage in (2, 3):
        raw = job(mid_model_dir, stage=stage, world=2, targets=["q_proj", "v_proj"], micro=1, seq=16)
        peaks[stage] = run_peak(parse_spec(raw).model_dump(), 2, str(tmp_path_factory.mktemp(f"zero{stage}")),
                                steps=STEADY_STEPS)
    ratios = {rank: peaks[3][rank]["private_peak_bytes"] / peaks[2][rank]["private_peak_bytes"] for rank in range(2)}
    shown = {rank: (f"ZeRO-3 {peaks[3][rank]['private_phases']} B vs ZeRO-2 {peaks[2][rank]['private_phases']} B "
                    f"({ratio:.3f}); all resident {peaks[3][rank]['phases']} vs {peaks[2][rank]['phases']}")
             for rank, ratio in ratios.items()}
    print(shown)
    # The peak over loading the model and wrapping it in DeepSpeed, before any step.
    loaded = max(peaks[3][rank]["private_phases"]["initialize"] / peaks[2][rank]["private_phases"]["initialize"]
                 for rank in range(2))
    return {"ratio": max(ratios.values()), "loaded_ratio": loaded, "shown": shown}


def test_zero3_worker_loads_the_model_partitioned(zero_stage_peaks):
    """Up to the first step (load + deepspeed.initialize), a ZeRO-3 worker holds its shard, not the
    model: measured 0.547 x a ZeRO-2 worker's private memory (170 vs 310 MiB, 2026-12-07). Loading
    the whole model first, as every worker did before issue 19, puts it at 1 or more."""
    assert zero_stage_peaks["loaded_ratio"] <= 0.6, zero_stage_peaks["shown"]


def test_zero3_worker_stays_under_a_zero2_worker_in_the_steady_state(zero_stage_peaks):
    """From the second step on, DeepSpeed's default bounds (1e9 elements) kept the whole model
    gathered on every ZeRO-3 worker: 1.76x a ZeRO-2 worker's private memory at step 3 (614 vs
    349 MB per rank). planning/deepspeed.py bounds what stays gathered (zero3_live_elements)."""
    assert zero_stage_peaks["ratio"] <= 0.8, zero_stage_peaks["shown"]


@pytest.mark.xfail(reason="measured 2026-12-07 on 2 gloo ranks, 3 steps: private memory of a ZeRO-3 worker "
                          "0.65-0.66 x a ZeRO-2 worker's (214-219 vs 332 MiB): the shard (151 MiB), the weights "
                          "gathered in use and ahead (34 MiB at their peak), and 30-35 MiB that are not tensors "
                          "(a ZeRO-2 worker has 25 MiB of those); counting live tensors only, 188 vs 311 MiB "
                          "(0.60) (issue 19)", strict=False)
def test_zero3_worker_holds_well_under_a_zero2_worker(zero_stage_peaks):
    """Under ZeRO-3 the base loads already partitioned (zero.Init, each rank reading its own slice
    of each weight from the files), so each of 2 workers should peak at about half a ZeRO-2
    worker, which holds the whole model: measured from the processes over load + engine + steps.

    Measured as each process's private memory (RssAnon), not all its resident memory (VmHWM):
    transformers' from_pretrained (ZeRO-2) maps the safetensors files, and the mapped pages are the
    node's page cache, one copy shared by both ranks and dropped when the load ends; counted as
    each worker's, they were 606 of a ZeRO-2 rank's 910 MiB, which made the ratio look better
    than the model state it is meant to compare."""
    assert zero_stage_peaks["ratio"] <= 0.6, zero_stage_peaks["shown"]
