"""Pure translations: spec -> optimizer steps, DeepSpeed config, Ray resources."""

import pytest

from orchestrator.planning.deepspeed import deepspeed_config
from orchestrator.planning.resources import resources
from orchestrator.planning.steps import optimizer_steps, warmup_steps
from orchestrator.spec import parse_spec


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


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("use_gpu", [False, True])
def test_deepspeed_config_per_stage(stage, use_gpu):
    spec = spec_with(stage, micro_batch_size=8, grad_accum=4)
    cfg = deepspeed_config(spec, world_size=2, use_gpu=use_gpu, total_steps=100)
    assert "auto" not in list(walk(cfg)), "DeepSpeed config must hold concrete values only"
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["train_batch_size"] == 8 * 4 * 2
    assert cfg["train_micro_batch_size_per_gpu"] == 8 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["bf16"] == {"enabled": True}
    assert cfg["optimizer"]["params"]["lr"] == spec.training.learning_rate
    # torch's AdamW: nothing to JIT-compile on the node (FusedAdam would need a compiler).
    assert cfg["optimizer"]["params"]["torch_adam"] is True
    assert ("stage3_gather_16bit_weights_on_model_save" in cfg["zero_optimization"]) is (stage == 3)
    assert "offload_optimizer" not in cfg["zero_optimization"]


def test_offload_settings():
    raw = {"name": "t", "data": {"train": "x"}, "training": {"max_steps": 10},
           "distributed": {"deepspeed": {"stage": 3, "offload_optimizer": True, "offload_params": True}}}
    cfg = deepspeed_config(parse_spec(raw), world_size=4, use_gpu=True, total_steps=10)
    zero = cfg["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    # Optimizer offload runs DeepSpeed's CPU Adam, never torch's.
    assert "torch_adam" not in cfg["optimizer"]["params"]


@pytest.mark.parametrize("name,ds_type", [("cosine", "WarmupCosineLR"), ("linear", "WarmupDecayLR"),
                                          ("constant", "WarmupLR")])
def test_scheduler_translation(name, ds_type):
    spec = spec_with(lr_scheduler=name, warmup_ratio=0.1)
    sched = deepspeed_config(spec, world_size=1, use_gpu=False, total_steps=100)["scheduler"]
    assert sched["type"] == ds_type
    assert sched["params"]["warmup_num_steps"] == 10
    if name != "constant":
        assert sched["params"]["total_num_steps"] == 100


def test_zero_warmup_still_valid_for_deepspeed():
    spec = spec_with(warmup_ratio=0.0)
    assert warmup_steps(spec, 100) == 0
    cfg = deepspeed_config(spec, world_size=1, use_gpu=False, total_steps=100)
    assert cfg["scheduler"]["params"]["warmup_num_steps"] == 1


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
