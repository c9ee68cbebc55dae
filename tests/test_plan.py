"""Pure translations: spec -> optimizer steps, DeepSpeed config, Ray resources."""

import pytest

from orchestrator.planning.deepspeed import DS_DEFAULT_BUCKET, deepspeed_config
from orchestrator.planning.resources import resources
from orchestrator.planning.steps import optimizer_steps, warmup_steps
from orchestrator.spec import parse_spec


ADAPTER = 20_000_000  # trainable parameters: a LoRA adapter of a 7B model
LARGEST = 32_000 * 4096  # elements of a 7B Llama's largest weight (the embedding)
HIDDEN = 4096  # a 7B Llama's hidden size


def ds_config(spec, world_size: int, use_gpu: bool, total_steps: int, trainable: int = ADAPTER) -> dict:
    """The DeepSpeed config of `spec` for a 7B Llama's counts (an adapter of `trainable` parameters)."""
    return deepspeed_config(spec, world_size=world_size, use_gpu=use_gpu, total_steps=total_steps,
                            trainable_params=trainable, largest_param=LARGEST, hidden_size=HIDDEN)


def spec_with(stage=2, **training):
    raw = {"name": "t", "data": {"train": "x"}, "training": {"max_steps": 100, **training},
           "distributed": {"num_workers": 2, "deepspeed": {"stage": stage}}}
    return parse_spec(raw)


def walk(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from walk(v)
    else:
        yield obj


def parsed(cfg: dict, world_size: int, monkeypatch):
    """`cfg` as DeepSpeed itself reads it (`deepspeed.runtime.config.DeepSpeedConfig`, the parser
    `deepspeed.initialize` runs): a key it rejects, or batch sizes that disagree with the world
    size, raise here rather than on a cluster. The parser asks the process group for the world
    size; there is none in a unit test, so it is told the one the config was made for."""
    import deepspeed.runtime.config as ds_config

    monkeypatch.setattr(ds_config.dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(ds_config.dist, "get_world_size", lambda *a, **k: world_size)
    return ds_config.DeepSpeedConfig(cfg)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("use_gpu", [False, True])
def test_deepspeed_config_per_stage(stage, use_gpu, monkeypatch):
    spec = spec_with(stage, micro_batch_size=8, grad_accum=4)
    cfg = ds_config(spec, 2, use_gpu, 100)
    assert "auto" not in list(walk(cfg)), "DeepSpeed config must hold concrete values only"
    ds = parsed(cfg, 2, monkeypatch)
    zero = ds.zero_config
    assert ds.zero_optimization_stage == stage
    assert (ds.train_batch_size, ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps) == (64, 8, 4)
    assert ds.bfloat16_config.enabled and not ds.float16_config.enabled
    assert ds.optimizer_name == "adamw" and ds.optimizer_params["lr"] == spec.training.learning_rate
    # torch's AdamW: nothing to JIT-compile on the node (FusedAdam would need a compiler)
    # (DeepSpeed passes its other keys on to torch.optim.AdamW).
    assert ds.optimizer_params["torch_adam"] is True
    # torch's fused AdamW, as HF Trainer steps (one kernel for all the adapter's tensors).
    assert ds.optimizer_params["fused"] is True
    # Buckets sized for the adapter, not DeepSpeed's 5e8 elements (1 GB each in bf16).
    if stage >= 1:
        assert zero.reduce_bucket_size == zero.allgather_bucket_size == ADAPTER
    if stage == 3:
        # Gathers the frozen base ahead, a layer's weight at a time: transformers' 0.9 x hidden².
        assert zero.prefetch_bucket_size == round(0.9 * HIDDEN * HIDDEN) == 15_099_494
        # At most the largest weight held gathered besides the one in use, not DeepSpeed's 1e9
        # elements (the whole of any model under 1B parameters from the second step on).
        assert zero.max_live_parameters == zero.max_reuse_distance == LARGEST
    assert ds.gradient_clipping == spec.training.max_grad_norm
    # Overlapping the gradient reduction with backward needs CUDA streams: on the GPU only.
    assert zero.overlap_comm is (use_gpu and stage >= 1)
    assert zero.gather_16bit_weights_on_model_save is (stage == 3)
    assert zero.offload_optimizer is None and zero.offload_param is None


@pytest.mark.parametrize("use_gpu", [False, True])
def test_offload_settings(use_gpu, monkeypatch):
    raw = {"name": "t", "data": {"train": "x"}, "training": {"max_steps": 10},
           "distributed": {"num_workers": 4, "deepspeed": {"stage": 3, "offload_optimizer": True,
                                                           "offload_params": True}}}
    cfg = ds_config(parse_spec(raw), 4, use_gpu, 10)
    zero = parsed(cfg, 4, monkeypatch).zero_config
    assert zero.offload_optimizer.device == "cpu" and zero.offload_param.device == "cpu"
    # Pinned host memory speeds up copies to and from a GPU; without one it only locks RAM.
    assert zero.offload_optimizer.pin_memory is use_gpu and zero.offload_param.pin_memory is use_gpu
    # Optimizer offload runs DeepSpeed's CPU Adam, never torch's.
    assert "torch_adam" not in cfg["optimizer"]["params"]


@pytest.mark.parametrize("trainable,bucket", [(0, 1), (4_096, 4_096), (ADAPTER, ADAPTER),
                                              (7_000_000_000, DS_DEFAULT_BUCKET)])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_buckets_follow_the_trainable_count(trainable, bucket, stage, monkeypatch):
    """Every bucket size DeepSpeed's parser accepts, capped at its default for full fine-tuning."""
    cfg = ds_config(spec_with(stage), 2, True, 10, trainable=trainable)
    zero = parsed(cfg, 2, monkeypatch).zero_config
    assert zero.reduce_bucket_size == zero.allgather_bucket_size == bucket


@pytest.mark.parametrize("stage,offload", [(2, True), (3, False), (3, True)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_every_variant_passes_deepspeeds_parser(stage, offload, dtype, monkeypatch):
    raw = {"name": "t", "model": {"dtype": dtype}, "quantization": {"bits": None}, "data": {"train": "x"},
           "training": {"max_steps": 10},
           "distributed": {"num_workers": 2, "deepspeed": {"stage": stage, "offload_optimizer": offload}}}
    for use_gpu in (False, True):
        cfg = ds_config(parse_spec(raw), 2, use_gpu, 10)
        ds = parsed(cfg, 2, monkeypatch)
        assert ds.zero_optimization_stage == stage
        assert (ds.float16_config.enabled, ds.bfloat16_config.enabled) == (dtype == "float16", dtype == "bfloat16")


@pytest.mark.parametrize("name,ds_type", [("cosine", "WarmupCosineLR"), ("linear", "WarmupDecayLR"),
                                          ("constant", "WarmupLR")])
def test_scheduler_translation(name, ds_type, monkeypatch):
    spec = spec_with(lr_scheduler=name, warmup_ratio=0.1)
    cfg = ds_config(spec, 1, False, 100)
    sched = cfg["scheduler"]
    assert parsed(cfg, 1, monkeypatch).scheduler_name == sched["type"] == ds_type
    assert sched["params"]["warmup_num_steps"] == 10
    if name != "constant":
        assert sched["params"]["total_num_steps"] == 100


def test_zero_warmup_still_valid_for_deepspeed(monkeypatch):
    spec = spec_with(warmup_ratio=0.0)
    assert warmup_steps(spec, 100) == 0
    cfg = ds_config(spec, 1, False, 100)
    assert parsed(cfg, 1, monkeypatch).scheduler_params["warmup_num_steps"] == 1


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_without_warmup_the_first_step_trains_at_the_full_rate(name):
    """DeepSpeed's own scheduler, built from the generated config, on a real optimizer: without a
    warm-up the first optimizer step already has the job's learning rate (a linear warm-up from 0
    would leave it - and, with DeepSpeed's minimum of 2 warm-up steps, the second at half - untrained)."""
    import torch
    from deepspeed.runtime import lr_schedules

    spec = spec_with(lr_scheduler=name, warmup_ratio=0.0)
    sched = ds_config(spec, 1, False, 100)["scheduler"]
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=spec.training.learning_rate)
    scheduler = getattr(lr_schedules, sched["type"])(optimizer, **sched["params"])
    for step in (1, 2):  # the engine steps the optimizer, then the scheduler
        assert optimizer.param_groups[0]["lr"] == pytest.approx(spec.training.learning_rate, rel=0.01), step
        scheduler.step()


def test_optimizer_steps_from_max_steps_or_epochs():
    assert optimizer_steps(spec_with(), 1000, 2) == 100
    raw = {"name": "t", "data": {"train": "x"},
           "training": {"epochs": 2, "micro_batch_size": 4, "grad_accum": 2}}
    # 1000 examples / (4 x 2 x 2 workers = 16 per step) = 62.5 -> 63 per epoch, x2 epochs = 125
    assert optimizer_steps(parse_spec(raw), 1000, 2) == 125


@pytest.mark.parametrize("use_gpu,gpus,expected", [("auto", 0, False), ("auto", 4, True),
                                                   (True, 0, True), (False, 8, False)])
def test_resources(use_gpu, gpus, expected):
    raw = {"name": "t", "data": {"train": "x"}, "training": {"max_steps": 1},
           "distributed": {"num_workers": 3, "use_gpu": use_gpu, "cpus_per_worker": 2}}
    res = resources(parse_spec(raw), gpus_available=gpus)
    assert (res.num_workers, res.use_gpu, res.cpus_per_worker) == (3, expected, 2)
    sc = res.scaling_config()
    assert sc.num_workers == 3 and sc.use_gpu == expected
    assert sc.resources_per_worker == {"CPU": 2, **({"GPU": 1} if expected else {})}
