"""The DeepSpeed config of a job: concrete values only, never "auto" (pure: no I/O, no Ray calls)."""

from __future__ import annotations

from orchestrator.planning.steps import warmup_steps
from orchestrator.spec import JobSpec

# A large `steps_per_print` keeps DeepSpeed's own per-step log lines out of the console;
# the orchestrator logs metrics itself (rank 0 -> MLflow).
_DS_STEPS_PER_PRINT = 1_000_000


def _scheduler(spec: JobSpec, total_steps: int) -> dict:
    t = spec.training
    # DeepSpeed's schedulers reject zero warm-up steps; one step of warm-up is a no-op in effect.
    warm = max(1, warmup_steps(spec, total_steps))
    if t.lr_scheduler == "cosine":
        return {"type": "WarmupCosineLR", "params": {
            "total_num_steps": total_steps, "warmup_num_steps": warm, "warmup_type": "linear",
            "warmup_min_ratio": 0.0, "cos_min_ratio": 0.1}}
    if t.lr_scheduler == "linear":
        return {"type": "WarmupDecayLR", "params": {
            "total_num_steps": total_steps, "warmup_num_steps": warm, "warmup_type": "linear",
            "warmup_min_lr": 0.0, "warmup_max_lr": t.learning_rate}}
    return {"type": "WarmupLR", "params": {
        "warmup_num_steps": warm, "warmup_type": "linear",
        "warmup_min_lr": 0.0, "warmup_max_lr": t.learning_rate}}


def deepspeed_config(spec: JobSpec, *, world_size: int, use_gpu: bool, total_steps: int) -> dict:
    """The DeepSpeed config for this job: concrete values only, never "auto"."""
    t, ds = spec.training, spec.distributed.deepspeed
    micro, accum = t.micro_batch_size, t.grad_accum
    offload_opt = ds.offload_optimizer and ds.stage > 0
    config: dict = {
        # train_batch_size = micro batch x accumulation x world size, e.g. 8 x 1 x 2 = 16.
        "train_batch_size": micro * accum * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": t.max_grad_norm,
        "steps_per_print": _DS_STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
        "optimizer": {"type": "AdamW", "params": {
            "lr": t.learning_rate, "betas": [0.9, 0.999], "eps": 1e-8,
            "weight_decay": t.weight_decay,
            # DeepSpeed's FusedAdam is JIT-compiled on first use (it needs a CUDA compiler on the
            # node, or builds a CPU op); torch's AdamW is the same update with nothing to build.
            # `fused`: torch's single-kernel AdamW (CPU and CUDA), HF Trainer's default; without
            # it torch steps an adapter's ~2 x 7 x layers small tensors one by one, a loop of
            # about a dozen ops per tensor. Optimizer offload runs DeepSpeedCPUAdam, which
            # DeepSpeed picks itself.
            **({"torch_adam": True, "fused": True} if not offload_opt else {}),
        }},
        "scheduler": _scheduler(spec, total_steps),
        "zero_optimization": {"stage": ds.stage},
    }
    if spec.model.dtype == "bfloat16":
        config["bf16"] = {"enabled": True}
    elif spec.model.dtype == "float16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    zero = config["zero_optimization"]
    if ds.stage >= 1:
        zero.update({"overlap_comm": use_gpu, "contiguous_gradients": True})
    if ds.stage >= 2:
        zero.update({"reduce_scatter": True, "allgather_partitions": True})
    if ds.stage == 3:
        # Gather the full 16-bit weights when saving so the adapter (or model) on disk is whole.
        zero.update({"stage3_gather_16bit_weights_on_model_save": True})
    if offload_opt:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.offload_params and ds.stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    return config
