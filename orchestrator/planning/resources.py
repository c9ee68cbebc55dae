"""Per-worker resources for Ray: the translation of `distributed` into Ray's terms (pure; Ray is
imported only to build a `ScalingConfig`)."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.spec import JobSpec


@dataclass(frozen=True)
class Resources:
    """Per-worker resources for Ray: the translation of `distributed` into Ray's terms."""

    num_workers: int
    use_gpu: bool
    cpus_per_worker: int

    def scaling_config(self):
        from ray.train import ScalingConfig

        return ScalingConfig(num_workers=self.num_workers, use_gpu=self.use_gpu,
                             resources_per_worker={"CPU": self.cpus_per_worker,
                                                   **({"GPU": 1} if self.use_gpu else {})})


def resources(spec: JobSpec, *, gpus_available: float) -> Resources:
    """Worker resources; `use_gpu: auto` means "GPUs if the cluster has any"."""
    d = spec.distributed
    use_gpu = (gpus_available > 0) if d.use_gpu == "auto" else bool(d.use_gpu)
    return Resources(num_workers=d.num_workers, use_gpu=use_gpu, cpus_per_worker=d.cpus_per_worker)
