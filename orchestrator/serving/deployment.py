"""The Ray Serve application behind `orchestrator serve`: one deployment (N replicas), each
replica holding the base once per PEFT method and quantization, with every served adapter
(`ServedAdapters`), behind a FastAPI ingress speaking the OpenAI API; `/v1/reload` (and, with
`reload_every`, a timer) re-resolves the aliases. Ray, Serve and FastAPI are imported inside the
functions.

No `from __future__ import annotations` here: FastAPI reads the handlers' annotations (`Request`,
imported inside `build_app`) as objects; as strings it could not resolve them and would take
`request` for a query parameter (HTTP 422)."""

from orchestrator.serving.adapters import BATCH_WAIT_S, MAX_BATCH

APP_NAME = "orchestrator"
# Requests a replica completes together at most, by default: MAX_BATCH (ServedAdapters: concurrent
# greedy requests with the same max_tokens and stop strings share one batched generation). Serve
# gathers non-streamed requests for up to BATCH_WAIT_S after the first (`@serve.batch`), and lets a
# replica hold two batches' worth, so the next batch gathers while one runs; streams are gathered
# the same way by the replica's own batcher (ServedAdapters.stream).
BATCH_HEADER = "x-orchestrator-batch-size"  # on every answer: the requests generated in its batch


def build_app(refs: list[str], tracking_uri: str, replicas: int = 1, reload_every: float | None = None,
              cpus_per_replica: float = 1.0, gpus_per_replica: float = 0.0, max_batch: int = MAX_BATCH):
    """The bound Serve application (not started). `max_batch`: requests a replica completes
    together at most (1: each alone, every answer exactly `generate`'s)."""
    import asyncio
    import functools
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from ray import serve

    from orchestrator.models.inference import Decoding
    from orchestrator.serving import openai_api

    api = FastAPI(title="orchestrator serve")
    ongoing = max(2 * max_batch, 8)  # requests a replica holds at once

    @serve.deployment(name="OpenAIServer", num_replicas=replicas, max_ongoing_requests=ongoing,
                      ray_actor_options={"num_cpus": cpus_per_replica,
                                         **({"num_gpus": gpus_per_replica} if gpus_per_replica else {})})
    @serve.ingress(api)
    class OpenAIServer:
        def __init__(self, refs: list[str], tracking_uri: str, reload_every: float | None):
            from orchestrator.serving.adapters import ServedAdapters

            self.adapters = ServedAdapters(refs, tracking_uri, max_batch=max_batch)
            # A stream waits in a thread, for its batch to start and then for each piece: a thread of its
            # own per ongoing request. asyncio's default pool (min(32, CPUs + 4) threads) capped a stream
            # batch at 5 on a 2-core node, the running batch's readers holding the other threads.
            self.stream_threads = ThreadPoolExecutor(ongoing, thread_name_prefix="stream")
            self.adapters.load()
            if reload_every:
                # Every replica re-resolves on its own timer: a moved alias reaches all of them
                # within `reload_every` seconds (a /v1/reload request reaches one replica only).
                def poll():
                    import time

                    while True:
                        time.sleep(reload_every)
                        try:
                            self.adapters.load()
                        except Exception:  # the registry unreachable for a while: keep serving
                            pass

                threading.Thread(target=poll, daemon=True, name="alias-poll").start()

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=BATCH_WAIT_S)
        async def _complete(self, requests: list[dict]) -> list:
            """The requests Serve gathered, completed together in a worker thread (the replica's
            event loop stays free to take the next ones): an Answer or an exception each."""
            return await asyncio.to_thread(self.adapters.complete_many, requests)

        async def _answer(self, body: dict, chat: bool):
            served = list(self.adapters.models())
            try:
                args = openai_api.parse(body, chat, served)
                ref = args.pop("model")
                if ref not in served and f"models:/{ref}" not in served:
                    raise openai_api.RequestError(f"model: '{ref}' is not served here; one of {', '.join(served)}",
                                                  "model", status=404)
                stream, include_usage = args.pop("stream"), args.pop("include_usage")
                args["decoding"] = Decoding(**args["decoding"])
                if stream:
                    cancel = threading.Event()
                    # Waits for the lock, which a generation may hold, and for its batch to start: off the event loop.
                    s = await asyncio.get_running_loop().run_in_executor(
                        self.stream_threads, functools.partial(self.adapters.stream, ref, **args, cancel=cancel))
                    events = openai_api.stream_events(ref, s.pieces, s.version, chat, s.prompt_tokens, s.count,
                                                      args["max_tokens"], include_usage)
                    return StreamingResponse(_until_disconnected(events, cancel, self.stream_threads),
                                             media_type="text/event-stream", headers={BATCH_HEADER: str(s.batch_size)})
                answer = await self._complete(dict(ref=ref, **args))
            except openai_api.RequestError as e:
                return JSONResponse(e.to_json(), status_code=e.status)
            if isinstance(answer, Exception):
                raise answer
            body = openai_api.completion(ref, answer.text, answer.version, chat, answer.prompt_tokens, answer.tokens,
                                         args["max_tokens"])
            return JSONResponse(body, headers={BATCH_HEADER: str(answer.batch_size)})

        @api.get("/v1/models")
        def models(self):
            return openai_api.model_list(self.adapters.models())

        @api.post("/v1/completions")
        async def completions(self, request: Request):
            return await self._answer(await request.json(), chat=False)

        @api.post("/v1/chat/completions")
        async def chat_completions(self, request: Request):
            return await self._answer(await request.json(), chat=True)

        @api.post("/v1/reload")
        def reload(self):
            return {"models": self.adapters.load()}

    return OpenAIServer.bind(refs, tracking_uri, reload_every)


async def _until_disconnected(events, cancel, threads):
    """The server-sent `events` of a streamed answer as the model writes them, each read in a
    worker thread of `threads` (an executor), so the replica's event loop stays free. When the
    client goes away Serve cancels this generator (a plain generator it would only leave suspended,
    its generation running on to `max_tokens` with the adapter lock held: measured), and `cancel`
    stops the generation at its next token."""
    import asyncio

    done = object()
    try:
        loop = asyncio.get_running_loop()
        while (event := await loop.run_in_executor(threads, next, events, done)) is not done:
            yield event
    finally:
        cancel.set()


def app_builder(args: dict):
    """The application a Serve config names (`import_path: orchestrator.serving.deployment:app_builder`,
    written by `orchestrator k8s render --serve`), built from the config's `args`: models,
    tracking_uri, replicas, reload_every, cpus_per_replica, gpus_per_replica, max_batch."""
    reload_every = args.get("reload_every")
    return build_app(list(args["models"]), str(args["tracking_uri"]), int(args.get("replicas", 1)),
                     float(reload_every) if reload_every else None, float(args.get("cpus_per_replica", 1.0)),
                     float(args.get("gpus_per_replica", 0.0)), int(args.get("max_batch", MAX_BATCH)))


def start(refs: list[str], tracking_uri: str, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
          reload_every: float | None = None, cpus_per_replica: float = 1.0, max_batch: int = MAX_BATCH) -> str:
    """Deploy the application on the connected Ray instance and wait until it serves; returns
    its base URL."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(refs, tracking_uri, replicas, reload_every, cpus_per_replica, max_batch=max_batch),
              name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def stop() -> None:
    """Delete the application and shut Serve down (its controller and proxies free their CPUs)."""
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()


def reload(url: str, timeout_s: float = 300.0) -> dict:
    """Ask a running server to re-resolve its aliases; returns ref -> the version now served."""
    import json
    import urllib.request

    request = urllib.request.Request(f"{url.rstrip('/')}/v1/reload", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())["models"]
