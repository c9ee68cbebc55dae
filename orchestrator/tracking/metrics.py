"""Rank 0's per-step metrics, buffered and sent to the run in batches (`MetricLogger`)."""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Callable

from orchestrator.spec import redact_uri
from orchestrator.tracking.runs import CLIENT_ENV, _client

# A worker's MLflow calls fail fast when the server is down (MLflow's own default retries for
# minutes); the logger keeps what it could not send and tries again at its next flush.
_WORKER_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# What a training worker's MLflow calls need in its environment, given to the process when it
# starts (launch.TRAINING_WORKER_ENV), so that the worker never changes its environment while it
# runs: setenv beside the getenv of torch's, gloo's and Ray's own threads is a data race in glibc
# (a restarted rank-0 worker died of SIGSEGV in getenv 0.1 s after its process group came up,
# 2026-12-07). The setdefault calls below then find every key set.
WORKER_MLFLOW_ENV = {**CLIENT_ENV, **_WORKER_HTTP_ENV}


class MetricLogger:
    """Buffered per-step metrics from rank 0 into an existing run.

    Metrics are sent in batches (at evaluation and checkpoint steps, every `flush_interval_s`
    seconds, and at the end) rather than one request per step. A failed send keeps the buffer, so
    the next flush retries it: an unreachable server never stops training. A step the run already
    has for a metric (logged before a worker failure or a driver restart) is not sent again, so
    each step appears once.

    After `start_background()` (the training worker calls it before its first step) `send`, and
    whatever `later` is given, run on the logger's own thread, in order: the training thread does
    not wait for a database write or an HTTP request (a slow or hanging server costs it nothing).
    Before it they run on the calling thread, so the first sends' imports of MLflow's store and
    artifact code (most of a CPU-second, which would otherwise slow the first steps beside them:
    docs/benchmarks.md) are paid before training starts. `flush` always sends on the calling
    thread (the worker's send before each checkpoint). `close` waits for the logger's thread and
    sends what is left.
    """

    def __init__(self, uri: str, run_id: str, flush_interval_s: float = 10.0, fail_fast: bool = True):
        self.uri, self.run_id, self.flush_interval_s = uri, run_id, flush_interval_s
        self._last_flush = time.monotonic()
        self._buffer: list[tuple[str, float, int, int]] = []  # (key, value, timestamp ms, step)
        self._buffer_lock = threading.Lock()  # `log` (training thread) against a send (sender thread)
        self._send_lock = threading.Lock()  # one send at a time
        self._logged: dict[str, set[int]] = {}  # metric -> steps the run has, fetched once per metric
        self.last_error: Exception | None = None
        self._queue: queue.Queue | None = None  # the sender thread's work, once started
        self._sender: threading.Thread | None = None
        self._send_waiting = threading.Event()
        if fail_fast:  # in a worker process, whose only MLflow calls are these
            for k, v in _WORKER_HTTP_ENV.items():
                os.environ.setdefault(k, v)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        with self._buffer_lock:
            self._buffer += [(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        if time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.send()

    def extend(self, pending: list[dict]) -> None:
        """Add metrics that another process could not send (`close()`'s return value)."""
        with self._buffer_lock:
            self._buffer += [(m["key"], m["value"], m["timestamp"], m["step"]) for m in pending]

    def start_background(self) -> None:
        """From now on `send` and `later` run on the logger's own thread (until `close`)."""
        if self._sender is None:
            self._queue = queue.Queue()
            self._sender = threading.Thread(target=self._drain, args=(self._queue,), name="mlflow-sender",
                                            daemon=True)
            self._sender.start()

    def send(self) -> None:
        """Send what is buffered: on the sender thread without waiting (once started), else now.
        A send already waiting there takes these metrics too (no queue of sends behind an
        unreachable server)."""
        self._last_flush = time.monotonic()
        if self._send_waiting.is_set():
            return
        self._send_waiting.set()
        self.later(self._queued_flush)

    def _queued_flush(self) -> None:
        self._send_waiting.clear()
        self.flush()

    def later(self, fn: Callable[[], object]) -> None:
        """Run `fn` (an MLflow call) after the sends queued before it: on the sender thread
        (once started), else now."""
        if self._queue is None:
            fn()
            return
        self._queue.put(fn)

    def _drain(self, work: queue.Queue) -> None:
        while (fn := work.get()) is not None:
            try:
                fn()
            except Exception as e:  # `flush` never raises; anything else given to `later` must not stop the sends
                detail = str(e).replace(self.uri, redact_uri(self.uri))
                print(f"MLflow call on the sender thread failed: {type(e).__name__}: {detail}", flush=True)

    def flush(self) -> bool:
        """Send what is buffered now; True when it all arrived. Never raises: a failure is kept in
        `last_error` and the metrics go back to the buffer."""
        from mlflow.entities import Metric

        self._last_flush = time.monotonic()
        with self._send_lock:
            with self._buffer_lock:
                batch, self._buffer = self._buffer, []
            if not batch:
                return True
            try:
                client = _client(self.uri)
                for key in {m[0] for m in batch} - self._logged.keys():
                    self._logged[key] = {m.step for m in client.get_metric_history(self.run_id, key)}
                batch = [m for m in batch if m[3] not in self._logged[m[0]]]
                while batch:
                    chunk = batch[:1000]  # MLflow takes at most 1000 metrics a batch
                    client.log_batch(self.run_id, metrics=[Metric(*m) for m in chunk])
                    for m in chunk:
                        self._logged[m[0]].add(m[3])
                    del batch[:len(chunk)]
            except Exception as e:  # unreachable, timed out, 5xx: all mean "try again later"
                with self._buffer_lock:
                    self._buffer[:0] = batch
                    waiting = len(self._buffer)
                if self.last_error is None:
                    print(f"MLflow at {redact_uri(self.uri)} unreachable ({type(e).__name__}); keeping "
                          f"{waiting} metric value(s) to send later", flush=True)
                self.last_error = e
                return False
        self.last_error = None
        return True

    def close(self, timeout_s: float, interval_s: float = 2.0) -> list[dict]:
        """Wait for the sender thread, then flush, retrying for up to `timeout_s`; returns what is
        still unsent (empty when all arrived), as plain dicts for `extend`."""
        deadline = time.monotonic() + timeout_s
        if self._sender is not None:
            self._queue.put(None)
            self._sender.join()
            self._sender = self._queue = None
        while not self.flush() and time.monotonic() < deadline:
            time.sleep(interval_s)
        with self._buffer_lock:
            return [{"key": k, "value": v, "timestamp": ts, "step": step} for k, v, ts, step in self._buffer]
