"""Where a job's time goes: seconds per named phase, on the driver and in the workers.

    watch = Stopwatch()
    with watch("eval"):
        ...
    watch.metrics()  # {"time_eval_s": 1.234}

The phases end up as `time_<phase>_s` metrics in MLflow and in `orchestrator run --json`, so
the fixed costs of a job (starting Ray, starting workers, loading the model, registering) can
be told apart from the training itself; `benchmarks/` reads them.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager


class Stopwatch:
    """Seconds accumulated per phase name (a phase entered twice adds up)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds

    def metrics(self) -> dict[str, float]:
        return {f"time_{phase}_s": round(s, 3) for phase, s in self.seconds.items()}
