"""What Ray Train itself costs on this machine: a `TorchTrainer` whose workers do nothing.

    python benchmarks/ray_floor.py --workers 2

Starts a local Ray instance as the orchestrator does, fits a TorchTrainer (gloo, one CPU per
worker) whose function only notes when it started, and stops Ray. Prints one JSON object: seconds
for `ray.init`, from `fit()` to the workers' function, from there to the end of `fit()`, for
`ray.shutdown()`, and the wall time of the process so far. No model, no data, no MLflow: the
floor under any job the orchestrator runs through Ray Train.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

STARTED = time.perf_counter()


def started_at(config: dict) -> None:
    """The workers' function: rank 0 writes when it began."""
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        with open(config["marker"], "w", encoding="utf-8") as f:
            f.write(str(time.time()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from orchestrator.training.launch import WORKER_ENV

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    times = {}
    start = time.perf_counter()
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": dict(WORKER_ENV)})
    times["ray_init"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        marker = os.path.join(tmp, "started")
        fit_wall = time.time()
        start = time.perf_counter()
        TorchTrainer(started_at, train_loop_config={"marker": marker},
                     scaling_config=ScalingConfig(num_workers=args.workers, resources_per_worker={"CPU": 1}),
                     torch_config=TorchConfig(backend="gloo"),
                     run_config=RunConfig(storage_path=os.path.join(tmp, "runs"))).fit()
        fit_s = time.perf_counter() - start
        with open(marker, encoding="utf-8") as f:
            times["worker_start"] = float(f.read()) - fit_wall
    times["finish"] = fit_s - times["worker_start"]
    start = time.perf_counter()
    ray.shutdown()
    times["shutdown"] = time.perf_counter() - start
    times["wall"] = time.perf_counter() - STARTED
    print(json.dumps({f"{k}_s": round(v, 3) for k, v in times.items()}))


if __name__ == "__main__":
    main()
