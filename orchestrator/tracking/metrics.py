"""Rank 0's per-step metrics, buffered and sent to the run in batches (`MetricLogger`)."""

from __future__ import annotations

import os
import time

from orchestrator.spec import redact_uri
from orchestrator.tracking.runs import _client

# A worker's MLflow calls fail fast when the server is down (MLflow's own default retries for
# minutes); the logger keeps what it could not send and tries again at its next flush.
_WORKER_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class MetricLogger:
    """Buffered per-step metrics from rank 0 into an existing run.

    Metrics are sent in batches (at evaluation and checkpoint steps, every `flush_interval_s`
    seconds, and at the end) rather than one request per step: each send is a database write or
    an HTTP request on the training thread. A failed send keeps the buffer, so the next flush
    retries it: an unreachable server never stops training. A step the run already has for a
    metric (logged before a worker failure or a driver restart) is not sent again, so each step
    appears once.
    """

    def __init__(self, uri: str, run_id: str, flush_interval_s: float = 10.0, fail_fast: bool = True):
        self.uri, self.run_id, self.flush_interval_s = uri, run_id, flush_interval_s
        self._last_flush = time.monotonic()
        self._buffer: list = []
        self._logged: dict[str, set[int]] = {}  # metric -> steps the run has, fetched once per metric
        self.last_error: Exception | None = None
        if fail_fast:  # in a worker process, whose only MLflow calls are these
            for k, v in _WORKER_HTTP_ENV.items():
                os.environ.setdefault(k, v)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        if time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def extend(self, pending: list[dict]) -> None:
        """Add metrics that another process could not send (`close()`'s return value)."""
        from mlflow.entities import Metric

        self._buffer += [Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in pending]

    def flush(self) -> bool:
        """Send what is buffered; True when nothing is left. Never raises: a failure is kept in
        `last_error` and the metrics stay buffered."""
        self._last_flush = time.monotonic()
        if not self._buffer:
            return True
        try:
            client = _client(self.uri)
            for key in {m.key for m in self._buffer} - self._logged.keys():
                self._logged[key] = {m.step for m in client.get_metric_history(self.run_id, key)}
            self._buffer = [m for m in self._buffer if m.step not in self._logged[m.key]]
            while self._buffer:
                chunk = self._buffer[:1000]  # MLflow takes at most 1000 metrics a batch
                client.log_batch(self.run_id, metrics=chunk)
                for m in chunk:
                    self._logged[m.key].add(m.step)
                del self._buffer[:len(chunk)]
        except Exception as e:  # unreachable, timed out, 5xx: all mean "try again later"
            if self.last_error is None:
                print(f"MLflow at {redact_uri(self.uri)} unreachable ({type(e).__name__}); keeping "
                      f"{len(self._buffer)} metric value(s) to send later", flush=True)
            self.last_error = e
            return False
        self.last_error = None
        return True

    def close(self, timeout_s: float, interval_s: float = 2.0) -> list[dict]:
        """Flush, retrying for up to `timeout_s`; returns what is still unsent (empty when all
        arrived), as plain dicts for `extend`."""
        deadline = time.monotonic() + timeout_s
        while not self.flush() and time.monotonic() < deadline:
            time.sleep(interval_s)
        return [{"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in self._buffer]
