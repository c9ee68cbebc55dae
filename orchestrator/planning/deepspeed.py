"""The DeepSpeed config of a job: concrete values only, never "auto" (pure: no I/O, no Ray calls)."""

from __future__ import annotations

from orchestrator.planning.steps import warmup_steps
from orchestrator.spec import JobSpec

# DeepSpeed's defaults (deepspeed/runtime/zero/config.py) are sized for training every weight of a
# large model: a 5e8-element gradient bucket is 1 GB in bf16, and ZeRO-1/2 keep two of them when
# overlap_comm is on. An adapter of 20M parameters fills 4% of one.
DS_DEFAULT_BUCKET = 500_000_000
DS_ZERO3_LIVE_DEFAULT = 1_000_000_000  # stage3_max_live_parameters and stage3_max_reuse_distance


def zero3_live_elements(largest_param: int) -> int:
    """ZeRO-3's bound on the weights a worker holds gathered besides the one in use
    (`stage3_max_live_parameters`, and `stage3_max_reuse_distance`): the model's largest weight,
    so one weight can be fetched ahead (or kept for reuse) at a time.

    DeepSpeed's default, 1e9 elements for both, is sized for models of tens of billions of
    parameters: once the first step has recorded the order of the modules, DeepSpeed keeps every
    weight that is used again within 1e9 elements gathered, so for a model under 1B parameters
    every worker holds the whole model from the second step on. Measured on 2 CPU ranks, a
    150M-parameter bf16 model, 3 steps, private memory per rank: ZeRO-3 614 MB with the defaults,
    245 MB with this bound (278 MB with twice it as max_live_parameters, 222 MB with both 0), ZeRO-2 349 MB
    (tests/test_memory_measured.py); 214-219 MiB (224-230 MB) with this bound and the prefetch bucket of
    `zero3_prefetch_elements`, ZeRO-2 332 MiB. Never above DeepSpeed's default."""
    return min(largest_param, DS_ZERO3_LIVE_DEFAULT)


def zero3_prefetch_elements(hidden_size: int, live: int) -> int:
    """ZeRO-3's prefetch bucket (`stage3_prefetch_bucket_size`): the elements of frozen base weights
    gathered ahead of the layer that needs them. 0.9 x hidden_size², transformers' value for "auto"
    (about one attention projection ahead: 15.1M elements for hidden 4096), within the bound on
    gathered weights (`live`).

    Sized for the base's layers, not its largest weight: measured on 2 CPU ranks, a 154M-parameter
    bf16 model (hidden 1024, largest weight 8.4M elements), a step took 0.69-0.75 s with this
    bucket (0.94M elements) against 0.86-0.87 s with the largest weight as the bucket, and 0.93 s
    with none; its gathered weights peaked at 34 MiB against 42 (tests/test_memory_measured.py's
    model, micro batch 1 x 16 tokens; 1.39-1.43 s against 1.54-1.62 s at 4 x 64)."""
    return min(round(0.9 * hidden_size * hidden_size), live)


def bucket_elements(trainable_params: int) -> int:
    """Elements per gradient bucket (reduce and all-gather): the whole trainable set in one bucket,
    so an adapter is reduced once per step and its buckets are no bigger than its gradients,
    capped at DeepSpeed's 5e8 default (full fine-tuning of a large model)."""
    return max(1, min(int(trainable_params), DS_DEFAULT_BUCKET))


# A large `steps_per_print` keeps DeepSpeed's own per-step log lines out of the console;
# the orchestrator logs metrics itself (rank 0 -> MLflow).
_DS_STEPS_PER_PRINT = 1_000_000


def _scheduler(spec: JobSpec, total_steps: int) -> dict:
    t = spec.training
    warm = warmup_steps(spec, total_steps)
    # DeepSpeed's schedulers reject zero warm-up steps, and a linear warm-up starts at its minimum
    # (the first optimizer step at learning rate 0). Without a warm-up, the minimum is the full
    # rate, so the first step trains at it.
    start = 0.0 if warm else 1.0
    warm = max(1, warm)
    if t.lr_scheduler == "cosine":
        # WarmupCosineLR sets the rate to 0 when it starts at iteration -1, whatever its minimum;
        # starting at iteration 0 it leaves the optimizer at the job's rate for the first step.
        return {"type": "WarmupCosineLR", "params": {
            "total_num_steps": total_steps, "warmup_num_steps": warm, "warmup_type": "linear",
            "warmup_min_ratio": start, "cos_min_ratio": 0.1, "last_batch_iteration": 0 if start else -1}}
    if t.lr_scheduler == "linear":
        return {"type": "WarmupDecayLR", "params": {
            "total_num_steps": total_steps, "warmup_num_steps": warm, "warmup_type": "linear",
            "warmup_min_lr": start * t.learning_rate, "warmup_max_lr": t.learning_rate}}
    return {"type": "WarmupLR", "params": {
        "warmup_num_steps": warm, "warmup_type": "linear",
        "warmup_min_lr": start * t.learning_rate, "warmup_max_lr": t.learning_rate}}


def deepspeed_config(spec: JobSpec, *, world_size: int, use_gpu: bool, total_steps: int,
                     trainable_params: int, largest_param: int, hidden_size: int) -> dict:
    """The DeepSpeed config for this job: concrete values only, never "auto". Bucket sizes follow
    `trainable_params`, ZeRO-3's bounds on gathered weights `largest_param` and its prefetch
    `hidden_size` (the planner's counts and dimensions, `MemoryPlan.params.trainable`, `.largest`
    and `MemoryPlan.architecture.hidden_size`)."""
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
    bucket = bucket_elements(trainable_params)
    if ds.stage >= 1:
        # Overlapping the reduction with backward needs CUDA streams (and doubles ZeRO-1/2's bucket).
        zero.update({"overlap_comm": use_gpu, "contiguous_gradients": True,
                     "reduce_bucket_size": bucket, "allgather_bucket_size": bucket})
    if ds.stage >= 2:
        zero.update({"reduce_scatter": True, "allgather_partitions": True})
    if ds.stage == 3:
        # Gather the full 16-bit weights when saving so the adapter (or model) on disk is whole.
        live = zero3_live_elements(largest_param)
        zero.update({"stage3_gather_16bit_weights_on_model_save": True,
                     "stage3_max_live_parameters": live, "stage3_max_reuse_distance": live,
                     "stage3_prefetch_bucket_size": zero3_prefetch_elements(hidden_size, live)})
    # Stage 0 all-reduces the gradients in buckets of at most 5e8 elements (engine.allreduce_gradients;
    # not a config key): each bucket is a flat copy of gradients that exist, never more than the
    # trainable count, so it is already sized for an adapter.
    if offload_opt:
        # Pinned host memory speeds up copies to and from a GPU; without one it only locks RAM.
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.offload_params and ds.stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    return config
