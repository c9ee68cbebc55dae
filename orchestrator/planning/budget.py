"""The GPU memory to plan against (given, the local GPU's, a known GPU type's, or an assumed
80 GiB), and the plan `orchestrator run` checks before it launches. Asks torch for the local
GPU's size, inside a function."""

from __future__ import annotations

from orchestrator.planning.architectures import architecture_for
from orchestrator.planning.memory import MemoryPlan, memory_plan
from orchestrator.planning.units import GiB
from orchestrator.spec import JobSpec

DEFAULT_GPU_MEMORY = 80 * GiB

# Memory of one GPU of each type (the size it is sold as, like DEFAULT_GPU_MEMORY), keyed as Ray
# names the type in a GPU node's `accelerator_type:<TYPE>` resource (ray.util.accelerators; Ray
# derives it from the GPU's name, "NVIDIA H100 80GB HBM3" -> H100). Where a type is sold in
# several sizes, the smallest: a job planned to fit it fits them all; `AMBIGUOUS_GPU_TYPES` names
# the sizes so the plan can say so.
GPU_MEMORY_BY_TYPE: dict[str, int] = {
    "K80": 12 * GiB,        # per GPU; a K80 board holds two
    "P4": 8 * GiB,
    "P100": 12 * GiB,
    "V100": 16 * GiB,
    "T4": 16 * GiB,
    "A10": 24 * GiB,
    "A10G": 24 * GiB,
    "L4": 24 * GiB,
    "L40": 48 * GiB,
    "L40S": 48 * GiB,
    "A100": 40 * GiB,
    "A100-40G": 40 * GiB,
    "A100-80G": 80 * GiB,
    "H100": 80 * GiB,
    "H20": 96 * GiB,
    "H200": 141 * GiB,
}
AMBIGUOUS_GPU_TYPES = {"P100": "12 or 16 GB", "V100": "16 or 32 GB", "A100": "40 or 80 GB",
                       "H100": "80 or 94 GB (NVL)"}


def local_gpu_memory() -> tuple[int, str] | None:
    """(bytes, name) of this machine's first CUDA GPU, or None without one."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return int(props.total_memory), props.name


def gpu_budget(gpu_memory_bytes: int | None) -> tuple[int, str]:
    """The GPU memory to plan against, and where that figure came from."""
    if gpu_memory_bytes is not None:
        return gpu_memory_bytes, "given"
    local = local_gpu_memory()
    if local is not None:
        return local[0], f"local GPU ({local[1]})"
    return DEFAULT_GPU_MEMORY, "no GPU here: assuming an 80 GiB GPU (pass --gpu-memory)"


def plan_for_run(spec: JobSpec, world_size: int, gpu_memory_bytes: int | None,
                 source: str | None = None) -> MemoryPlan:
    """The plan `orchestrator run` checks before it launches: raises `SpecError` when the
    architecture cannot be read; the caller refuses the job when `plan.fits` is false.
    `source`: where a given `gpu_memory_bytes` came from (default "given")."""
    budget, where = gpu_budget(gpu_memory_bytes)
    source = source if gpu_memory_bytes is not None and source else where
    return memory_plan(spec, architecture_for(spec), world_size=world_size, gpu_memory_bytes=budget,
                       gpu_memory_source=source)
