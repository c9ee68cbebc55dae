"""The memory planner: what a job needs on each GPU (and in each node's host memory), and how
to make it fit, before any GPU is spent.

The arithmetic of fine-tuning with Adam in mixed precision, per trained parameter:

    2 B  16-bit weight (what forward and backward compute with)
    2 B  16-bit gradient
    4 B  fp32 gradient (DeepSpeed converts the gradient before the optimizer step)
    4 B  fp32 master weight (Adam updates this copy; the 16-bit weight is cast from it)
    8 B  Adam's two fp32 moments
   ----
   20 B  per parameter, before activations: a 7B model needs ~135 GB to fully fine-tune.

The folk rule of "4 B weights + 8 B Adam + 4 B gradients, ~24 B/param with activations" is the
fp32 version of the same table. PEFT trains ~0.1-1% of the parameters, so only the frozen
weights stay (2 B/param in bf16, ~0.52 B/param at 4-bit NF4 with double quantization), and
ZeRO stages 1/2/3 divide optimizer states / gradients / weights by the number of GPUs.

Every figure below names the DeepSpeed, bitsandbytes or transformers structure it stands for;
`tests/test_memory_measured.py` checks the parameter, gradient and optimizer figures against the
tensors a live DeepSpeed engine holds, and the activation figures against a measured forward and
backward pass. The parameters are counted in `planning.parameters`, the architecture read in
`planning.architectures` (the one place that reads a `config.json`), the changes that would make a
job fit chosen in `planning.advice`, and the GPU budget found in `planning.budget` (which asks
torch for the local GPU's size); everything here is pure, and torch is never imported at module import.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from orchestrator.planning.advice import Recommendation, recommendations
from orchestrator.planning.architectures import Architecture
from orchestrator.planning.deepspeed import bucket_elements, zero3_live_elements
from orchestrator.planning.parameters import (DTYPE_BYTES, METHOD_TRAINS, ParamCount, ParamTensor, count_params,
                                              parameter_tensors, quantized_bytes, targeted_expert_elements,
                                              targeted_roles, trainable_tensors)
from orchestrator.planning.units import GiB
from orchestrator.spec import BASE_TRAINING_METHODS, JobSpec

# DeepSpeed defaults (deepspeed/runtime/zero/config.py) that planning/deepspeed.py leaves alone; the
# bucket sizes and ZeRO-3 bounds it sets come from planning.deepspeed (bucket_elements, zero3_live_elements).
DS_PERSISTENCE_THRESHOLD = 100_000  # elements: ZeRO-3 keeps smaller parameters whole on every rank
DS_ALIGNMENT = 2  # ZeRO-1/2 pad their flat buffer to a multiple of 2 x world size elements

# Evaluation scores at most this many positions' logits at a time in fp32 (training.steps.evaluate):
# never a full-vocabulary fp32 copy of a whole batch's logits. The plan's evaluation term uses it.
EVAL_LOSS_CHUNK_TOKENS = 1024

# bitsandbytes 4-bit storage (bitsandbytes.functional.quantize_4bit): 2 weights per byte, one
# absmax per 64 weights; with double quantization that absmax is itself 8-bit, with one fp32
# absmax per 256 of them, a 256-entry fp32 code book and an fp32 offset. Each tensor also has its
# 16-entry fp32 NF4/FP4 code.
NF4_BLOCKSIZE = 64
DOUBLE_QUANT_BLOCKSIZE = 256

# What the CUDA caching allocator does not report: the CUDA context with cuBLAS/NCCL workspaces,
# and fragmentation (memory reserved but not allocated).
CUDA_CONTEXT_BYTES = 1 * GiB
ALLOCATOR_SLACK = 0.10


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Activations:
    """Bytes of activations on one GPU for one micro batch."""

    saved_per_layer: int  # tensors one decoder layer saves for backward
    saved: int  # everything saved for backward at the end of the forward pass
    peak: int  # the most that is live at once during forward + backward
    eval_peak: int = 0  # the most that is live at once while evaluating one micro batch (no grad)

    @property
    def planned(self) -> int:
        """What the plan reserves: training and evaluation run one after the other, never together."""
        return max(self.peak, self.eval_peak)


def activation_bytes(spec: JobSpec, arch: Architecture, device: str = "cuda") -> Activations:
    """What autograd keeps for one micro batch in transformers' Llama with SDPA attention.

    The terms follow the tensors each op saves for backward (checked against a CPU measurement in
    tests/test_memory_measured.py): RMSNorm computes in fp32 and saves its fp32 input; attention
    saves q, k, v (k and v repeated to every head: transformers does so whenever a padding mask
    is passed), its output and an fp32 log-sum-exp; the SwiGLU MLP saves four I-wide tensors;
    frozen linear layers save nothing of their own, LoRA saves its input and its r-wide middle.
    """
    e = DTYPE_BYTES[spec.model.dtype]
    b, s = spec.training.micro_batch_size, spec.data.max_seq_len
    t = b * s  # tokens per micro batch
    h, a, d, i_size, v = arch.hidden_size, arch.num_heads, arch.head_dim, arch.intermediate_size, arch.vocab_size
    method = spec.peft.method
    full = method == "full"
    # LoRA and IA3 save something at each targeted layer (IA3: its scaled input, taken as r=1);
    # the prompt methods and freeze send gradients down through frozen layers to what they train.
    targets = targeted_roles(arch, spec.peft.target_modules, method == "lora") if method in ("lora", "ia3") else ()
    r, dropout = (spec.peft.r, spec.peft.dropout) if method == "lora" else (1, 0.0)
    grad_through = method in ("prompt_tuning", "prefix_tuning", "adaption_prompt", "freeze")
    # Dropout on the CPU multiplies by a noise tensor in the model dtype; CUDA keeps a bool mask.
    mask_bytes = 1 if device == "cuda" else e
    shapes = arch.linear_shapes()
    # LoRA on a fused expert weight (peft's target_parameters) adds B A to the whole weight in
    # every forward, and the experts' matmuls keep that sum (experts x in x out, model dtype) for
    # backward: per layer, as many bytes as its targeted expert weights (Mixtral at hidden 256,
    # MLP 512, 8 experts: 8 x (1024 x 256 + 256 x 512) x 2 B = 6.3 MB; measured, docs/memory.md).
    fused = e * targeted_expert_elements(arch, spec.peft.target_modules) // arch.num_layers if method == "lora" else 0

    def norm(input_grad: bool) -> int:
        # x.float() and rsqrt(mean(x^2)) are saved when the input needs a gradient; the
        # normalized value (model dtype) is saved for the weight's own gradient when it trains.
        return (4 * h * t + 4 * t if input_grad else 0) + (e * h * t if full else 0)

    def linears(names: tuple[str, ...], x_grad: bool, input_saved: bool = False) -> int:
        """Saved by a group of linear layers reading the same input (`input_saved`: another op
        already saves that input, e.g. attention its output, which o_proj reads)."""
        fan_in = shapes[names[0]][0]
        hit = [n for n in names if n in targets]
        n = 0
        if (full or (hit and dropout == 0)) and not input_saved:
            n += e * fan_in * t  # the input, for the weight gradient (shared by the group)
        for _ in hit:
            n += e * r * t  # LoRA's A output, for B's gradient
            if dropout > 0:  # LoRA applies its own dropout: the dropped input, and its mask
                n += e * fan_in * t + (mask_bytes * fan_in * t if x_grad else 0)
        return n

    def layer(input_grad: bool) -> int:
        n = norm(input_grad) + fused
        x1_grad = input_grad or full
        n += linears(("q_proj", "k_proj", "v_proj"), x1_grad)
        attn_grad = x1_grad or any(m in targets for m in ("q_proj", "k_proj", "v_proj"))
        if attn_grad:
            n += e * t * a * d * 4 + 4 * t * a  # q, k, v (all heads), output; fp32 log-sum-exp
            if arch.qk_norm:  # Qwen3's per-head RMSNorm on q and k (before k is repeated)
                heads = a + arch.num_kv_heads
                n += 4 * t * heads * (d + 1) + (e * t * heads * d if full else 0)
        n += linears(("o_proj",), attn_grad, input_saved=attn_grad)
        mid_grad = input_grad or attn_grad or full or "o_proj" in targets
        n += norm(mid_grad)
        x2_grad = mid_grad or full
        n += linears(("gate_proj", "up_proj"), x2_grad)
        gate_grad = x2_grad or "gate_proj" in targets
        up_grad = x2_grad or "up_proj" in targets
        # silu(gate) saves gate; silu(gate) * up saves both factors for each other's gradient.
        n += e * i_size * t * (int(gate_grad) + int(up_grad) + int(gate_grad))
        n += linears(("down_proj",), gate_grad or up_grad)
        return n

    trains_below = full or bool(targets) or grad_through
    per_layer = layer(input_grad=trains_below)
    # Without gradient checkpointing the first layer's input (the frozen embedding) needs no
    # gradient under LoRA; with it, transformers makes the embedding output require one, and
    # prompt tuning trains the embeddings it prepends to that input.
    first = layer(input_grad=full or spec.model.gradient_checkpointing or method == "prompt_tuning")
    head = norm(trains_below) + (e * h * t if full else 0)  # final norm; lm_head's input if it trains
    head += 8 * t * (2 if full else 1) + 4  # int64 labels (and input ids for the embedding gradient)
    misc = e * b * s * s + 2 * e * s * d  # the 4D attention mask and RoPE cos/sin, shared by all layers
    # The worker runs the output layer on the trained positions only (training.steps.
    # TrainedPositionsLoss): its logits terms count every position, the most it can be (every
    # position trained), since which positions are trained is the data's.
    logits_saved = 4 * v * t  # fp32 log-softmax, saved by the loss
    # The loss upcasts the logits to fp32; its backward holds the saved log-softmax, the gradient
    # coming in and the one going out, all fp32 and vocabulary-wide: 12 B x vocab per token.
    logits_peak = max(4 + 4 + 4, e + 4 + 4) * v * t

    if spec.model.gradient_checkpointing:
        # transformers checkpoints each decoder layer: only its input stays, and backward
        # recomputes one layer at a time (by then the loss and head tensors are freed).
        inputs = e * h * t * arch.num_layers
        saved = inputs + head + logits_saved + misc
        peak = max(inputs + head + logits_peak + misc, inputs + per_layer + misc + _backward_transient(arch, e, t))
        return Activations(saved_per_layer=per_layer, saved=saved, peak=peak,
                           eval_peak=eval_activation_bytes(spec, arch))
    layers = first + per_layer * (arch.num_layers - 1)
    saved = layers + head + logits_saved + misc
    peak = max(layers + head + logits_peak + misc, layers + misc + _backward_transient(arch, e, t))
    return Activations(saved_per_layer=per_layer, saved=saved, peak=peak, eval_peak=eval_activation_bytes(spec, arch))


def eval_activation_bytes(spec: JobSpec, arch: Architecture) -> int:
    """The most that is live at once while evaluating one micro batch without gradients
    (training.steps.evaluate): the larger of a decoder layer's forward and the loss.

    Forward: nothing is saved for backward, so only one layer's tensors are live: the residual
    stream, its normed copy and RMSNorm's fp32 upcast, and the MLP's three I-wide tensors (silu(gate), up, their
    product; a LoRA-wrapped gate or up adds its own I-wide output). Loss: the logits in the
    model dtype of the micro batch's trained positions (`TrainedPositionsLoss.logits`; counted
    here as every position, the most they can be), and the cross-entropy over at
    most EVAL_LOSS_CHUNK_TOKENS positions at a time, in fp32: the upcast chunk and its
    log-softmax, e.g. 1024 x 128,256 x 4 B x 2 = 1 GiB for Llama 3, against 16 GiB of fp32
    logits for a micro batch of 8 x 4096 tokens without chunks."""
    e = DTYPE_BYTES[spec.model.dtype]
    b, s = spec.training.micro_batch_size, spec.data.max_seq_len
    t = b * s
    h, i_size, v = arch.hidden_size, arch.intermediate_size, arch.vocab_size
    targets = targeted_roles(arch, spec.peft.target_modules) if spec.peft.method == "lora" else ()
    mlp_wide = 3 + int(any(m in targets for m in ("gate_proj", "up_proj")))
    misc = e * b * s * s + 2 * e * s * arch.head_dim  # the 4D attention mask, RoPE cos/sin
    layer = (2 * e + 4) * t * h + mlp_wide * e * t * i_size + misc  # residual, normed copy, RMSNorm's fp32 upcast
    chunk = min(EVAL_LOSS_CHUNK_TOKENS, t)
    loss = e * t * v + 2 * 4 * chunk * v
    return max(layer, loss)


def _backward_transient(arch: Architecture, e: int, t: int) -> int:
    # Gradients in flight inside one layer's backward: the MLP's three I-wide ones and the
    # residual stream's.
    return e * t * (3 * arch.intermediate_size + 2 * arch.hidden_size)


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """One term of the plan: where the bytes go, and the arithmetic."""

    category: str  # weights | trainable | gradients | optimizer | activations | buffers | overhead
    key: str  # a stable name for the term (grad16, master, zero3_gathered_params, ...)
    what: str
    bytes: int
    where: str = "gpu"  # gpu | cpu (per GPU; multiply by GPUs per node for the node)


@dataclass(frozen=True)
class MemoryPlan:
    """What one GPU (and each node's host memory) needs for a job, and whether it fits."""

    architecture: Architecture
    params: ParamCount
    world_size: int
    gpus_per_node: int
    gpu_memory_bytes: int
    gpu_memory_source: str
    lines: tuple[Line, ...]
    activations: Activations
    recommendations: tuple[Recommendation, ...] = ()
    assumptions: tuple[str, ...] = field(default_factory=tuple)

    def gpu(self, category: str) -> int:
        return sum(x.bytes for x in self.lines if x.where == "gpu" and x.category == category)

    def term(self, key: str, where: str = "gpu") -> int:
        """Bytes of one named term (0 when the plan has no such term)."""
        return sum(x.bytes for x in self.lines if x.where == where and x.key == key)

    @property
    def total_bytes(self) -> int:
        return sum(x.bytes for x in self.lines if x.where == "gpu")

    @property
    def allocated_bytes(self) -> int:
        """What the CUDA caching allocator hands out (torch.cuda.max_memory_allocated's view)."""
        return self.total_bytes - self.gpu("overhead")

    @property
    def cpu_per_gpu_bytes(self) -> int:
        return sum(x.bytes for x in self.lines if x.where == "cpu")

    @property
    def cpu_per_node_bytes(self) -> int:
        return self.cpu_per_gpu_bytes * self.gpus_per_node

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.gpu_memory_bytes

    def to_json(self) -> dict:
        cats = ("weights", "trainable", "gradients", "optimizer", "activations", "buffers", "overhead")
        return {
            "model": {"base": self.architecture.name, "source": self.architecture.source,
                      **({"note": self.architecture.note} if self.architecture.note else {})},
            "params": {"total": self.params.total, "trainable": self.params.trainable},
            "world_size": self.world_size,
            "gpus_per_node": self.gpus_per_node,
            "gpu_memory_bytes": self.gpu_memory_bytes,
            "gpu_memory_source": self.gpu_memory_source,
            "per_gpu": {**{f"{c}_bytes": self.gpu(c) for c in cats}, "total_bytes": self.total_bytes,
                        "allocated_bytes": self.allocated_bytes},
            "activations": asdict(self.activations),
            "per_node_cpu": {"total_bytes": self.cpu_per_node_bytes, "per_gpu_bytes": self.cpu_per_gpu_bytes},
            "fits": self.fits,
            "lines": [asdict(x) for x in self.lines],
            "recommendations": [{"change": r.change, "set": list(r.sets), "total_bytes": r.total_bytes,
                                 "fits": r.fits, "world_size": r.world_size} for r in self.recommendations],
            "assumptions": list(self.assumptions),
        }


def _shard(numel: int, world: int) -> int:
    # ZeRO-3 pads each parameter to a multiple of the world size and keeps one equal part per rank.
    return math.ceil(numel / world)


def memory_plan(spec: JobSpec, arch: Architecture, *, world_size: int, gpu_memory_bytes: int,
                gpu_memory_source: str = "", gpus_per_node: int | None = None, device: str = "cuda",
                advise: bool = True) -> MemoryPlan:
    """The per-GPU and per-node memory of `spec` on `world_size` GPUs (pure).

    `device="cpu"` switches the few terms that differ on the CPU (used by the tests that measure
    on the CPU); with `advise`, a plan that does not fit carries the changes that would make it.
    """
    ds = spec.distributed.deepspeed
    stage, w = ds.stage, world_size
    e = DTYPE_BYTES[spec.model.dtype]
    mixed = spec.model.dtype != "float32"
    full = spec.peft.method == "full"
    q = spec.quantization
    bits = None if spec.peft.method in BASE_TRAINING_METHODS else q.bits
    train = trainable_tensors(spec, arch)
    counts = count_params(arch)  # of the whole model; the plan's trainable count is `p` below
    trained_base = {t.name for t in train} if spec.peft.method == "freeze" else set()
    offload_opt = ds.offload_optimizer and stage > 0
    offload_par = ds.offload_params and stage == 3
    per_node = gpus_per_node or min(w, 8)
    lines: list[Line] = []

    def add(category: str, key: str, what: str, nbytes: int, where: str = "gpu") -> None:
        if nbytes:
            lines.append(Line(category, key, what, int(nbytes), where))

    def resident(t: ParamTensor, nbytes: int, elem: int) -> tuple[int, int]:
        """(GPU, CPU) bytes of one parameter's 16-bit (or packed) storage on one rank."""
        if stage < 3:
            return nbytes, 0
        elements = nbytes // elem
        part = _shard(elements, w) * elem
        whole = nbytes if elements <= DS_PERSISTENCE_THRESHOLD else 0  # persistent: kept gathered
        return (whole, part) if offload_par else (whole + part, 0)

    # --- weights: the frozen base ------------------------------------------------------------
    frozen_gpu = frozen_cpu = constants = 0
    largest_quantized = 0
    if not full:
        for t in parameter_tensors(arch):
            if t.name in trained_base:
                continue
            if bits and t.quantizable:
                storage, const = quantized_bytes(t.numel, t.out_features, bits, q.double_quant)
                constants += const  # quant_state tensors are not parameters: never sharded
                largest_quantized = max(largest_quantized, t.numel)
                # Under ZeRO-3 the packed weights are stored in the model dtype so DeepSpeed can
                # shard them (bnb_4bit_quant_storage, see models.loading.quantization_config).
                g, c = resident(t, storage, e if stage == 3 and bits == 4 else 1)
            else:
                g, c = resident(t, t.numel * e, e)
            frozen_gpu, frozen_cpu = frozen_gpu + g, frozen_cpu + c
        kind = {None: spec.model.dtype, 4: f"4-bit {q.quant_type}", 8: "8-bit"}[bits]
        shard = " (ZeRO-3 shard)" if stage == 3 and w > 1 else ""
        add("weights", "frozen", f"frozen base in {kind}{shard}", frozen_gpu)
        add("weights", "quant_constants", "quantization constants (absmax, code books)", constants)
        add("weights", "frozen_offloaded", "frozen base shards (offload_params)", frozen_cpu, "cpu")

    # --- trainable parameters, gradients, optimizer ------------------------------------------
    p = sum(t.numel for t in train)
    if stage in (1, 2):
        # ZeRO-1/2 flatten the trainable parameters into one buffer padded to 2 x world elements
        # and give each rank an equal slice of it (stage_1_and_2.py: partition_size).
        flat = math.ceil(p / (DS_ALIGNMENT * w)) * DS_ALIGNMENT * w
        part = flat // w
    elif stage == 3:
        part = sum(_shard(t.numel, w) for t in train)
    else:
        part = p
    tg = tc = 0
    for t in train:
        g, c = resident(t, t.numel * e, e)
        tg, tc = tg + g, tc + c
    add("trainable", "trainable", f"{METHOD_TRAINS[spec.peft.method]} in {spec.model.dtype}"
        + (" (ZeRO-3 shard)" if stage == 3 and w > 1 else ""), tg)
    add("trainable", "trainable_offloaded", "trainable shards (offload_params)", tc, "cpu")

    # Where the optimizer's side lives, and which share of it this rank holds.
    where = "cpu" if offload_opt else "gpu"
    share = f" (1/{w})" if stage and w > 1 else ""
    if stage <= 1:  # stage 1 shards the optimizer only: every rank accumulates whole gradients
        add("gradients", "grad16", f"{spec.model.dtype} gradients", p * e)
    else:  # stage 2 reduce-scatters into a partition; stage 3's grad_partitions_flat_buffer
        add("gradients", "grad16", f"{spec.model.dtype} gradient partition{share}", part * e, where)
    if mixed:  # converted to fp32 just before the optimizer step, while the 16-bit ones still exist
        add("gradients", "grad32", f"fp32 gradients for the optimizer step{share}", part * 4, where)
    if mixed or stage > 0:  # ZeRO always keeps its own fp32 copy; stage 0 only in mixed precision
        add("optimizer", "master", f"fp32 master weights{share}", part * 4, where)
    add("optimizer", "adam", f"Adam exp_avg + exp_avg_sq, fp32{share}", part * 8, where)
    if offload_opt and stage in (1, 2):
        add("optimizer", "offload_staging", "16-bit staging copy of the partition (offload)", part * e, "cpu")

    # --- activations ---------------------------------------------------------------------------
    acts = activation_bytes(spec, arch, device=device)
    gc = "on" if spec.model.gradient_checkpointing else "off"
    # Training and evaluation take turns: the plan holds the larger of the two peaks.
    phase = "training" if acts.peak >= acts.eval_peak else "evaluation (logits + one fp32 loss chunk)"
    add("activations", "activations", f"micro batch {spec.training.micro_batch_size} x {spec.data.max_seq_len} "
                                      f"tokens, gradient checkpointing {gc} (peak of {phase})", acts.planned)

    # --- buffers: DeepSpeed's working memory ---------------------------------------------------
    # The gradient bucket ("ipg" buffer) is the size planning/deepspeed.py writes into the config.
    bucket = bucket_elements(p)
    if stage in (1, 2):
        n_buckets = 2 if device == "cuda" else 1  # deepspeed.py turns overlap_comm on with GPUs: two buckets
        add("buffers", "ipg_buckets", f"ZeRO gradient buckets ({n_buckets} x {bucket:.3g} elements)",
            n_buckets * bucket * e)
    if stage == 3:
        add("buffers", "ipg_buckets", f"ZeRO-3 gradient bucket ({bucket:.3g} elements)", bucket * e)
        largest_train = max(t.numel for t in train)
        biggest = max(counts.largest, largest_train)  # full trains the largest itself
        add("buffers", "zero3_gathered_params", "ZeRO-3 gathered parameters: the largest layer, whole", biggest * e)
        add("buffers", "zero3_gathered_grads", "ZeRO-3 gathered gradient of the largest trainable layer",
            largest_train * e)
        live = zero3_live_elements(counts.largest)  # the bound planning/deepspeed.py writes
        add("buffers", "zero3_live", f"ZeRO-3 weights gathered ahead or kept for reuse (at most {live:.3g} "
                                     "elements: stage3_max_live_parameters)", live * e)
    if stage == 0 and w > 1:
        # engine.allreduce_gradients flattens at most 5e8 elements of gradients at a time.
        add("buffers", "allreduce_bucket", "gradient all-reduce bucket", bucket * e)
    if largest_quantized:
        add("buffers", "dequantized_weight", "one weight dequantized for its matmul", largest_quantized * e)

    if device == "cuda":
        allocated = sum(x.bytes for x in lines if x.where == "gpu")
        add("overhead", "cuda_context", "CUDA context, cuBLAS/NCCL workspaces", CUDA_CONTEXT_BYTES)
        add("overhead", "allocator_slack", f"allocator slack ({ALLOCATOR_SLACK:.0%} of allocated)",
            allocated * ALLOCATOR_SLACK)

    plan = MemoryPlan(
        architecture=arch, params=replace(counts, trainable=p), world_size=w,
        gpus_per_node=per_node, gpu_memory_bytes=gpu_memory_bytes, gpu_memory_source=gpu_memory_source,
        lines=tuple(lines), activations=acts, assumptions=_assumptions(spec, arch, stage))
    if advise and not plan.fits:
        def plan_of(s: JobSpec, n: int) -> MemoryPlan:
            return memory_plan(s, arch, world_size=n, gpu_memory_bytes=gpu_memory_bytes,
                               gpus_per_node=gpus_per_node, device=device, advise=False)

        plan = replace(plan, recommendations=tuple(recommendations(spec, plan_of, world_size=w,
                                                                   gpu_memory_bytes=gpu_memory_bytes)))
    return plan


# DeepSpeed's CPU Adam (optimizer offload) runs its update on the worker's torch threads, which the
# worker sets to distributed.cpus_per_worker: with one CPU the whole optimizer step is one thread.
OFFLOAD_ONE_CPU = ("warning: distributed.deepspeed.offload_optimizer with distributed.cpus_per_worker=1: DeepSpeed's "
                   "CPU Adam runs the optimizer step on one thread; give each worker more CPUs (e.g. 8)")


def _assumptions(spec: JobSpec, arch: Architecture, stage: int) -> tuple[str, ...]:
    out = [f"sequences padded to data.max_seq_len={spec.data.max_seq_len} (the worst batch)",
           "Adam(W) with fp32 moments; gradient buckets as planning/deepspeed.py sizes them (the trainable count, "
           "at most 5e8 elements)"]
    if arch.note:
        out.append(f"{arch.name}: {arch.note}")
    if arch.counted:
        out.append(f"{arch.name}: parameters counted from transformers' own {arch.model_type} model built on the "
                   f"meta device; estimated terms: {'; '.join(arch.estimated)}")
    if stage == 3:
        out.append(f"ZeRO-3 keeps parameters of at most {DS_PERSISTENCE_THRESHOLD:,} elements whole on every rank")
    if spec.distributed.deepspeed.offload_optimizer or spec.distributed.deepspeed.offload_params:
        out.append("host memory counts DeepSpeed's offloaded state only, not the model load itself")
    if spec.distributed.deepspeed.offload_optimizer and stage > 0 and spec.distributed.cpus_per_worker == 1:
        out.append(OFFLOAD_ONE_CPU)
    return tuple(out)
