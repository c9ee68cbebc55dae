"""Measure what a job really holds, for tests/test_memory_measured.py.

Two instruments:

* `measure_activations`: one forward + backward of a transformers model, counting (a) the
  bytes autograd saves for backward (`saved_tensors_hooks`, deduplicated by storage, parameters
  excluded) and (b) the peak of live tensor bytes created during the pass (a dispatch mode that
  sees every op's outputs and notices when their storages die).
* `run_deepspeed_cases`: real DeepSpeed engines on the CPU (gloo, one process per rank), built
  the way the worker loop builds them (`load_base`, `prepare_for_training`, `deepspeed_config`);
  the bytes of parameters, gradients and optimizer state are read off the engine's own
  structures at the moment the inner optimizer steps.

Runs in spawned processes: DeepSpeed's process group and ZeRO-3's module hooks must not leak
into the test session.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


# --- activations ---------------------------------------------------------------------------------


def _peak_tracker_class():
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class PeakTracker(TorchDispatchMode):
        """Live bytes of storages created while active (views count once), and their peak."""

        def __init__(self, ignore=()):
            super().__init__()
            self.refs, self.live, self.peak, self.ignore = {}, 0, 0, set(ignore)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for key in [k for k, (ref, _) in self.refs.items() if ref.expired()]:
                self.live -= self.refs.pop(key)[1]
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    storage = t.untyped_storage()
                    key = storage.data_ptr()
                    if key in self.refs or key in self.ignore or storage.nbytes() == 0:
                        continue
                    self.refs[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            return out

    return PeakTracker


def measure_activations(model, batch: dict) -> tuple[int, int]:
    """(bytes saved for backward by one forward, peak live bytes over forward + backward).

    Gradients are dropped as soon as they are accumulated, as DeepSpeed's hooks move them into
    its own buffers; what remains is activations and the transient tensors of backward.
    """
    import torch

    existing = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    handles = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
               for p in model.parameters() if p.requires_grad]
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in existing:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    del loss
    tracker = _peak_tracker_class()(ignore=existing)
    with tracker:
        loss = model(**batch).loss  # the output object (and its logits) dies here, as in train_step
        loss.backward()
    for h in handles:
        h.remove()
    return sum(saved.values()), tracker.peak


def chunked_eval_loss(model, batch: dict, chunk_tokens: int):
    """(summed loss, counted tokens) of one batch as the evaluation computes it: the logits in the
    model dtype from `model(...).logits`, then cross-entropy in fp32 over `chunk_tokens` positions
    at a time. The labels are shifted (not the logits, which would copy them all)."""
    import torch
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = torch.full_like(batch["labels"], -100)
    labels[:, :-1] = batch["labels"][:, 1:]
    flat, targets = logits.view(-1, logits.shape[-1]), labels.view(-1)
    total = torch.zeros((), dtype=torch.float32)
    for start in range(0, flat.shape[0], chunk_tokens):
        total += F.cross_entropy(flat[start:start + chunk_tokens].float(), targets[start:start + chunk_tokens],
                                 ignore_index=-100, reduction="sum")
    return total, int((targets != -100).sum())


def measure_eval_peak(model, batch: dict, chunk_tokens: int) -> int:
    """Peak live bytes of evaluating one batch without gradients (`chunked_eval_loss`)."""
    import torch

    existing = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    model.eval()
    tracker = _peak_tracker_class()(ignore=existing)
    with torch.no_grad(), tracker:
        loss, _ = chunked_eval_loss(model, batch, chunk_tokens)
        del loss
    return tracker.peak


# --- DeepSpeed -------------------------------------------------------------------------------------


def quant_state_bytes(model) -> int:
    """Bytes of bitsandbytes' quantization constants (absmax, code books), each storage once."""
    import torch

    seen: dict[int, int] = {}

    def walk(state):
        for value in vars(state).values():
            if isinstance(value, torch.Tensor):
                s = value.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
            elif value is not None and hasattr(value, "absmax"):  # the nested (double-quant) state
                walk(value)

    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            walk(state)
        if getattr(p, "SCB", None) is not None:  # 8-bit: per-row scales
            seen[p.SCB.untyped_storage().data_ptr()] = tensor_bytes(p.SCB)
    return sum(seen.values())


def engine_bytes(engine, stage: int) -> dict:
    """Parameter bytes on this rank, read off the engine (frozen vs trainable)."""
    frozen = trainable = 0
    for p in engine.module.parameters():
        if stage == 3:
            n = tensor_bytes(p.ds_tensor)
            if getattr(p, "ds_persist", False):
                n += tensor_bytes(p.data)  # kept gathered: the whole parameter stays on this rank
        else:
            n = tensor_bytes(p.data)
        if p.requires_grad:
            trainable += n
        else:
            frozen += n
    if stage in (1, 2):  # the trainable parameters live in (views of) the flat 16-bit buffer
        trainable = sum(tensor_bytes(t) for t in engine.optimizer.bit16_groups_flat)
    constants = quant_state_bytes(engine.module)
    return {"weights": frozen + constants, "constants": constants, "trainable": trainable}


def gradient16_bytes(engine, stage: int) -> int:
    """The 16-bit gradients after backward, before the step."""
    opt = engine.optimizer
    if stage == 0:
        return sum(tensor_bytes(p.grad) for g in opt.fp16_groups for p in g if p.grad is not None)
    if stage == 3:
        return tensor_bytes(opt.grad_partitions_flat_buffer)
    if stage == 2 and opt.grads_in_partition is not None:
        return tensor_bytes(opt.grads_in_partition)
    return sum(tensor_bytes(t) for group in opt.averaged_gradients.values() if group for t in group)


def optimizer_view(engine, stage: int) -> tuple[list, object]:
    """(the fp32 tensors the inner optimizer updates, the inner torch optimizer)."""
    opt = engine.optimizer
    if stage == 0:
        return [p for g in opt.fp32_groups for p in g], opt.optimizer
    if stage == 3:
        return list(opt.fp32_partitioned_groups_flat), opt.optimizer
    return list(opt.single_partition_of_fp32_groups), opt.optimizer


def reachable_storages(engine) -> dict[int, int]:
    """Every tensor storage the engine can reach (its optimizer's object graph, the module's
    parameters, their gradients and ZeRO-3 partitions): data_ptr -> bytes."""
    import torch

    found: dict[int, int] = {}
    seen: set[int] = set()

    def add(t) -> None:
        if t.device.type != "meta" and t.untyped_storage().nbytes():
            found[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    def walk(obj, depth: int = 0) -> None:
        if depth > 8 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            add(obj)
            for extra in (obj.grad, getattr(obj, "ds_tensor", None)):
                if isinstance(extra, torch.Tensor):
                    add(extra)
            return
        if isinstance(obj, dict):
            for key, value in obj.items():
                walk(key, depth + 1)
                walk(value, depth + 1)
        elif isinstance(obj, (list, tuple, set)):
            for value in obj:
                walk(value, depth + 1)
        elif isinstance(obj, torch.optim.Optimizer) or type(obj).__module__.startswith("deepspeed"):
            if not isinstance(obj, torch.nn.Module):
                for value in vars(obj).values():
                    walk(value, depth + 1)

    walk(engine.optimizer)
    for p in engine.module.parameters():
        walk(p)
    return found


def _deepspeed_config(spec, world: int, total_steps: int) -> dict:
    """The DeepSpeed config a CPU worker of `spec` gets, sized from the spec's parameter counts."""
    from orchestrator.planning.architectures import architecture_for
    from orchestrator.planning.deepspeed import deepspeed_config
    from orchestrator.planning.parameters import count_params

    arch = architecture_for(spec)
    counts = count_params(arch, spec)
    return deepspeed_config(spec, world_size=world, use_gpu=False, total_steps=total_steps,
                            trainable_params=counts.trainable, largest_param=counts.largest,
                            hidden_size=arch.hidden_size)


def _run_case(case: dict, rank: int, world: int) -> dict:
    import deepspeed
    import torch

    from orchestrator.models.adapters import trainable_model
    from orchestrator.spec import JobSpec

    spec = JobSpec.model_validate(case["spec"])
    stage = spec.distributed.deepspeed.stage
    torch.manual_seed(0)
    config = _deepspeed_config(spec, world, total_steps=10)
    model = trainable_model(spec, spec.model.base, "cpu", config)  # as the worker builds it
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)

    masters, inner = optimizer_view(engine, stage)
    at_step: dict = {}
    step = inner.step

    def measured_step(*args, **kwargs):
        # The moment of peak model-state memory: fp32 gradients exist next to master and moments.
        at_step["grad32"] = sum(tensor_bytes(m.grad) for m in masters if m.grad is not None)
        out = step(*args, **kwargs)
        at_step["master"] = sum(tensor_bytes(m) for m in masters)
        at_step["moments"] = sum(tensor_bytes(v) for s in inner.state.values() for v in s.values()
                                 if torch.is_tensor(v) and v.dim() > 0)  # not the scalar step counts
        return out

    inner.step = measured_step
    engine.train()  # as train_step does (from_pretrained returns a model in eval mode)
    g = torch.Generator().manual_seed(rank)
    b, s = spec.training.micro_batch_size, spec.data.max_seq_len
    vocab = model.config.vocab_size
    grad16 = 0
    for _ in range(2):  # the second step runs with Adam's moments already allocated
        ids = torch.randint(0, vocab, (b, s), generator=g)
        mask = torch.ones_like(ids)
        mask[-1, s - s // 4:] = 0
        loss = engine(input_ids=ids, attention_mask=mask, labels=ids).loss
        engine.backward(loss)
        grad16 = gradient16_bytes(engine, stage)
        engine.step()
    reachable = sum(reachable_storages(engine).values())
    return {"name": case["name"], "rank": rank, **engine_bytes(engine, stage), "grad16": grad16, **at_step,
            "reachable_after_step": reachable}


def _worker(rank: int, world: int, port: int, cases: list[dict], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import deepspeed
    import torch

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    results = [_run_case(case, rank, world) for case in cases]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def spawn_ranks(target, world: int, *args) -> None:
    """Run `target(rank, world, port, *args)` in `world` fresh processes, one gloo rank each."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(target, args=(world, port, *args), nprocs=world, join=True)


def run_deepspeed_cases(cases: list[dict], world: int, out_dir: str) -> list[dict]:
    """Run each case on `world` CPU ranks; returns one result dict per case and rank."""
    spawn_ranks(_worker, world, cases, out_dir)
    return [r for rank in range(world) for r in json.loads(Path(out_dir, f"rank{rank}.json").read_text())]


# --- peak process memory of loading + one step ----------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class _PrivatePeak:
    """The highest private (anonymous) resident memory of this process, RssAnon, sampled every
    millisecond by a thread: the kernel keeps a high-water mark only of all resident memory
    (VmHWM), file-backed pages included. A sample can miss a peak shorter than a millisecond,
    never report one that was not there."""

    def __init__(self):
        import threading

        self.peak, self._stop = _status_kib("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _status_kib("RssAnon"))

    def read(self) -> int:
        """KiB: the peak so far (a sample taken now included)."""
        self.peak = max(self.peak, _status_kib("RssAnon"))
        return self.peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _join_as_a_cpu_worker(rank: int, world: int, port: int) -> None:
    """Join the gloo ranks with DeepSpeed's communication set up as setup_engine sets it on the CPU."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import deepspeed
    import torch

    from orchestrator.training.worker import gather_in_place_on_gloo, skip_shared_memory_comm_op

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    skip_shared_memory_comm_op(deepspeed)
    gather_in_place_on_gloo(deepspeed)


def _peak_worker(rank: int, world: int, port: int, spec_dump: dict, out_dir: str, steps: int) -> None:
    _join_as_a_cpu_worker(rank, world, port)
    import deepspeed
    import peft  # noqa: F401  imported before the baseline: code is not model state
    import torch
    import transformers  # noqa: F401

    from orchestrator.models.adapters import trainable_model
    from orchestrator.spec import JobSpec

    spec = JobSpec.model_validate(spec_dump)
    config = _deepspeed_config(spec, world, total_steps=2)
    # Autograd's engine and its threads start on the first backward: runtime, not model state.
    layer = torch.nn.Linear(8, 8)
    layer(torch.ones(2, 8)).sum().backward()
    del layer
    torch.distributed.barrier()
    baseline, private_baseline = _status_kib("VmRSS"), _status_kib("RssAnon")
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from here
    private = _PrivatePeak()
    phases, private_phases = {}, {}

    def mark(phase: str) -> None:
        phases[phase] = (_status_kib("VmHWM") - baseline) * 1024
        private_phases[phase] = (private.read() - private_baseline) * 1024

    model = trainable_model(spec, spec.model.base, "cpu", config)  # as setup_engine builds it
    mark("load")
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
    mark("initialize")
    engine.train()
    ids = torch.randint(0, model.config.vocab_size, (spec.training.micro_batch_size, spec.data.max_seq_len))
    for _ in range(steps):
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    mark("step")
    private.stop()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "peak_bytes": phases["step"], "phases": phases,
        "private_peak_bytes": private_phases["step"], "private_phases": private_phases}))


def peak_process_memory(spec_dump: dict, world: int, out_dir: str, steps: int = 1) -> list[dict]:
    """Each rank's peak memory over building the model the way the worker does, wrapping it in
    DeepSpeed and `steps` steps, above what the process held before (Python, torch, DeepSpeed, the
    process group, autograd's engine), in bytes, at the end of each phase (load, initialize, step):
    "peak_bytes" / "phases", all resident memory (VmHWM), file-backed pages included (libraries'
    code, a memory-mapped weight file: the node's page cache, shared by every process that maps
    it), and "private_peak_bytes" / "private_phases", the process's own pages (RssAnon, sampled:
    `_PrivatePeak`). One fresh process per rank."""
    spawn_ranks(_peak_worker, world, spec_dump, out_dir, steps)
    return [json.loads(Path(out_dir, f"rank{rank}.json").read_text()) for rank in range(world)]


# --- what a ZeRO-3 load puts in the partitions ---------------------------------------------------


def _zero3_weights_worker(rank: int, world: int, port: int, spec_dump: dict, out_dir: str) -> None:
    _join_as_a_cpu_worker(rank, world, port)
    import deepspeed
    import torch
    from safetensors.torch import load_file

    from orchestrator.models.loading import load_base_for_training
    from orchestrator.planning.deepspeed import deepspeed_config
    from orchestrator.spec import JobSpec

    spec = JobSpec.model_validate(spec_dump)
    config = deepspeed_config(spec, world_size=world, use_gpu=False, total_steps=2, trainable_params=1, largest_param=1,
                             hidden_size=1)
    model = load_base_for_training(spec, spec.model.base, "cpu", config)
    saved = {}
    for f in sorted(Path(spec.model.base).glob("*.safetensors")):
        saved.update(load_file(f))
    partitioned, differ = 0, []
    for name, param in model.named_parameters():
        partitioned += hasattr(param, "ds_tensor")
        with deepspeed.zero.GatheredParameters([param]):
            if not torch.equal(param.data, saved[name].to(param.dtype)):
                differ.append(name)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"partitioned": partitioned, "differ": differ,
                                                             "params": len(list(model.parameters()))}))


def zero3_loaded_weights(spec_dump: dict, world: int, out_dir: str) -> list[dict]:
    """Each rank's {"params", "partitioned", "differ"}: the base loaded for training under the job's
    ZeRO-3 config on `world` CPU ranks, each parameter gathered and compared with the file's tensor
    (`differ`: the names that are not equal)."""
    spawn_ranks(_zero3_weights_worker, world, spec_dump, out_dir)
    return [json.loads(Path(out_dir, f"rank{rank}.json").read_text()) for rank in range(world)]
