"""The one module that talks to a cluster's Ray Jobs API (and its state API) over HTTP.

This is a separate API from the Ray driver API in `training/launch.py`: nothing here joins the cluster
as a driver; it submits, watches, streams logs of and stops jobs through the dashboard address
(`http://HEAD:8265`).

Token authentication (Ray 2.52+, `RAY_AUTH_MODE=token` on the cluster) follows Ray's own
conventions: the token comes from `RAY_AUTH_TOKEN`, else from the file named by
`RAY_AUTH_TOKEN_PATH` (or `--token-file`), else, for a cluster on this machine or when
`RAY_AUTH_MODE=token` is set here, from Ray's default file `~/.ray/auth_token`. It travels only
in the request's Authorization header: never printed, logged, or put in the job's runtime env
or metadata.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import urlsplit

from orchestrator.cluster.submission import ClusterInfo, JobPackage, cluster_info, is_loopback_host

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Ray Train V2 runs each training worker in an actor of this class.
TRAIN_WORKER_CLASS = "RayTrainWorker"


class ClusterError(Exception):
    """A problem reaching or using the cluster that the user can fix (address, token, job id)."""

    def __init__(self, message: str, fix: str = ""):
        self.message, self.fix = message, fix
        super().__init__(f"{message}. Fix: {fix}" if fix else message)


@dataclass(frozen=True)
class Token:
    """A Ray auth token and where it came from; its value never appears in a repr or message."""

    value: str = field(repr=False)
    source: str

    def header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.value}"}


def find_token(address: str, env: Mapping[str, str], token_file: str | None = None,
               home: Path | None = None) -> Token | None:
    """The token for `address`, found the way Ray finds its own (see the module docstring)."""
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return Token(env["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    path = token_file or env.get("RAY_AUTH_TOKEN_PATH")
    if path:
        p = Path(path).expanduser()
        try:
            value = p.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ClusterError(f"cannot read the Ray auth token file {p}: {e.strerror}",
                               "point --token-file (or RAY_AUTH_TOKEN_PATH) at the cluster's token file") from None
        if not value:
            raise ClusterError(f"the Ray auth token file {p} is empty",
                               "write the cluster's token into it (`ray get-auth-token` on the head prints it)")
        return Token(value, f"file {p}")
    default = (home or Path.home()) / ".ray" / "auth_token"
    # Ray 2.59+ protects a local cluster with this file's token by default; a remote cluster
    # gets it only when token auth is asked for explicitly.
    local = is_loopback_host(urlsplit(address).hostname)
    if (local or env.get("RAY_AUTH_MODE", "").lower() == "token") and default.is_file():
        value = default.read_text(encoding="utf-8").strip()
        if value:
            return Token(value, f"file {default}")
    return None


def normalize_address(address: str | None) -> str:
    if not address:
        raise ClusterError("no cluster address", "pass --address http://HEAD:8265 or set RAY_ADDRESS")
    address = address.rstrip("/")
    if "://" not in address:
        address = f"http://{address}"
    return address


class Cluster:
    """One cluster's Jobs API: submit, inspect, follow and stop jobs."""

    def __init__(self, address: str | None, token: Token | None):
        from ray.job_submission import JobSubmissionClient

        # The SDK logs "Uploading package gcs://..." at INFO; the CLI says what happens itself.
        for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                     "ray._private.runtime_env.packaging"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.address = normalize_address(address)
        self.token = token
        self._headers = token.header() if token else {}
        with self._errors():
            self.client = JobSubmissionClient(self.address, headers=dict(self._headers))

    def _errors(self, submission_id: str | None = None):
        return _translate_errors(self.address, self.token, submission_id)

    # --- the cluster ---------------------------------------------------------------------------

    def info(self) -> ClusterInfo:
        """Alive nodes, their total CPUs and GPUs and the GPUs' types (from the state API)."""
        from ray.util.state import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        with self._errors():
            state = StateApiClient(self.address, headers={**self._headers, "Content-Type": "application/json"})
            nodes = state.list(StateResource.NODES, options=ListApiOptions(filters=[("state", "=", "ALIVE")]),
                               raise_on_missing_output=False)
        return cluster_info([_field(n, "resources_total") or {} for n in nodes], address=self.address)

    # --- jobs ----------------------------------------------------------------------------------

    def submit(self, package: JobPackage) -> str:
        with self._errors():
            return self.client.submit_job(entrypoint=package.entrypoint, runtime_env=package.runtime_env,
                                          metadata=package.metadata, submission_id=package.submission_id)

    def jobs(self) -> list:
        """Every job the cluster knows, newest first (Ray's `JobDetails`)."""
        with self._errors():
            jobs = self.client.list_jobs()
        return sorted(jobs, key=lambda j: j.start_time or 0, reverse=True)

    def details(self, submission_id: str):
        with self._errors(submission_id):
            return self.client.get_job_info(submission_id)

    def status(self, submission_id: str) -> str:
        with self._errors(submission_id):
            return str(self.client.get_job_status(submission_id).value)

    def logs(self, submission_id: str) -> str:
        with self._errors(submission_id):
            return self.client.get_job_logs(submission_id)

    def follow(self, submission_id: str, write: Callable[[str], None]) -> None:
        """Stream the job's logs to `write` until the job ends."""

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(submission_id):
                write(chunk)

        with self._errors(submission_id):
            asyncio.run(tail())

    def wait(self, submission_id: str, *, poll_s: float = 1.0, timeout_s: float | None = None,
             on_change: Callable[[str], None] | None = None) -> str:
        """Poll until the job ends (or `timeout_s` passes); returns the last status seen."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last = ""
        while True:
            status = self.status(submission_id)
            if status != last and on_change:
                on_change(status)
            last = status
            if status in TERMINAL or (deadline is not None and time.monotonic() > deadline):
                return status
            time.sleep(poll_s)

    def stop(self, submission_id: str) -> bool:
        """Ask the cluster to stop the job; False if it had already ended."""
        with self._errors(submission_id):
            return bool(self.client.stop_job(submission_id))

    def workers(self, submission_id: str) -> list[TrainWorker]:
        """The job's Ray Train workers: where each ran and whether it is still alive (from the
        state API, which keeps dead actors, so this also works after the job ended)."""
        from ray.util.state import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        job_id = self.details(submission_id).job_id
        if not job_id:  # the driver has not joined the cluster (yet)
            return []
        with self._errors(submission_id):
            state = StateApiClient(self.address, headers={**self._headers, "Content-Type": "application/json"})
            actors = state.list(StateResource.ACTORS, options=ListApiOptions(
                filters=[("job_id", "=", job_id), ("class_name", "=", TRAIN_WORKER_CLASS)]),
                raise_on_missing_output=False)
        return [TrainWorker(node_id=_field(a, "node_id"), state=_field(a, "state")) for a in actors]


@dataclass(frozen=True)
class TrainWorker:
    node_id: str
    state: str  # ALIVE, DEAD, PENDING_CREATION, RESTARTING, ...


def _field(obj, name: str):
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


class _translate_errors:
    """Turn the SDK's connection, authentication and not-found errors into `ClusterError`s."""

    def __init__(self, address: str, token: Token | None, submission_id: str | None):
        self.address, self.token, self.submission_id = address, token, submission_id

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None:
            return False
        import requests
        from ray.exceptions import AuthenticationError

        if isinstance(error, AuthenticationError):
            sent = f"the token from {self.token.source} was rejected" if self.token else "no auth token was sent"
            raise ClusterError(f"the cluster at {self.address} requires token authentication and {sent}",
                               "set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH / --token-file, to the cluster's "
                               "token (`ray get-auth-token` on the head node prints it)") from None
        if isinstance(error, (ConnectionError, requests.exceptions.RequestException)):
            raise ClusterError(f"cannot reach the Ray Jobs API at {self.address}",
                               "check the address (the head's dashboard port, 8265 by default) and that the "
                               "cluster is up; on Kubernetes: kubectl port-forward svc/CLUSTER-head-svc "
                               "8265:8265") from None
        if isinstance(error, RuntimeError) and "status code 404" in str(error) and self.submission_id:
            raise ClusterError(f"no job '{self.submission_id}' on the cluster at {self.address}",
                               "see the cluster's jobs with `orchestrator jobs list`") from None
        if isinstance(error, RuntimeError) and "Request failed with status code" in str(error):
            # The SDK's wording for any other HTTP error the cluster answered with.
            raise ClusterError(f"the cluster at {self.address} refused the request: {error}",
                               "check the cluster's dashboard logs (dashboard.log on the head node)") from None
        return False
