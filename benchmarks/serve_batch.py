"""Concurrent requests to one served version: batched, as `serve` completes them, against one at a time.

    python benchmarks/serve_batch.py                 # after `make demo`: models:/quickstart@candidate
    python benchmarks/serve_batch.py --model models:/NAME@ALIAS --tracking-uri URI --requests 8 --tokens 48 --threads 1

The version is held as a `serve` replica holds it (`ServedAdapters`; no HTTP, no Ray Serve), on
this machine's CPU or GPU as `generate` would load it. `--requests` prompts are sent at once, each
from a thread of its own, for at most `--tokens` tokens each, `--rounds` times per mode:

* streamed: each thread calls `stream` and reads its answer; the replica's batcher generates the
  streams that arrive together as one batch (`--max-batch`, 8), or one at a time with max_batch 1;
* not streamed: what Ray Serve's `@serve.batch` hands a replica, the requests in `complete_many`
  calls of at most max_batch each, one after another (max_batch 1: one call per request), in a
  worker thread as Serve runs them.

Both modes generate in threads other than the main one, as a replica does, with `--threads` intra-op
threads (Ray sets OMP_NUM_THREADS to a replica's CPUs: 1 for `orchestrator serve`). On this project's
2-core machine, with torch's 2 intra-op threads, the same generation took 2.3x as long there as
in the main thread (0.18 against 0.08 s, 48 tokens), and as long with 1 intra-op thread; likely
GNU OpenMP letting its workers spin less once its threads (a pool per thread that runs torch)
outnumber the cores, so each of a small model's many small operations pays a wake-up
(OMP_WAIT_POLICY=PASSIVE makes the main thread as slow).

Prints one JSON object: per mode, each round's wall time until the last answer is out, the batch
sizes the answers report, and for streams the time from each request to its first piece (median
and max). Ratios between the modes of one run are what to compare across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROMPTS = ["Describe the animal.\nI saw a brown owl at the river.", "Describe the animal.\nA cat on a wall.",
           "Describe the animal.\nA small fish in a lake.", "Describe the animal.\nA big dog in the park."]


def measure(served, ref: str, requests: int, tokens: int, rounds: int) -> dict:
    """`rounds` rounds of `requests` concurrent streams, then of the same requests not streamed."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]

    def one_stream(prompt: str) -> tuple[float, int]:
        sent = time.perf_counter()
        stream = served.stream(ref, prompt=prompt, max_tokens=tokens)
        first = None
        for _ in stream.pieces:
            first = first if first is not None else time.perf_counter() - sent
        return (first if first is not None else time.perf_counter() - sent), stream.batch_size

    streamed, whole = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        with ThreadPoolExecutor(requests) as pool:
            out = list(pool.map(one_stream, prompts))
        firsts = [f for f, _ in out]
        streamed.append({"wall_s": time.perf_counter() - start, "batch_sizes": sorted(b for _, b in out),
                         "first_piece_median_s": statistics.median(firsts), "first_piece_max_s": max(firsts)})
    asks = [dict(ref=ref, prompt=p, max_tokens=tokens) for p in prompts]
    for _ in range(rounds):
        start = time.perf_counter()
        # In a worker thread, as Serve runs a batch (asyncio.to_thread), and as every stream generates.
        with ThreadPoolExecutor(1) as pool:
            answers = [a for i in range(0, len(asks), served.max_batch)
                       for a in pool.submit(served.complete_many, asks[i:i + served.max_batch]).result()]
        whole.append({"wall_s": time.perf_counter() - start, "batch_sizes": sorted(a.batch_size for a in answers)})
    return {"streamed": streamed, "not_streamed": whole}


def run(ref: str, tracking_uri: str, requests: int = 8, tokens: int = 48, rounds: int = 3,
        max_batch: int | None = None) -> dict:
    """Both modes, batched (`max_batch`, serve's default) and one at a time (max_batch 1)."""
    from orchestrator.serving.adapters import MAX_BATCH, ServedAdapters

    import torch

    results = {"model": ref, "requests": requests, "tokens": tokens, "rounds": rounds,
               "intra_op_threads": torch.get_num_threads()}
    for label, size in (("batched", max_batch or MAX_BATCH), ("one_at_a_time", 1)):
        served = ServedAdapters([ref], tracking_uri, max_batch=size)
        served.load()
        served.complete(ref, prompt=PROMPTS[0], max_tokens=4)  # first-call costs out of the rounds
        results[label] = {"max_batch": size, **measure(served, ref, requests, tokens, rounds)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models:/quickstart@candidate")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=None, help="the batched mode's (default: serve's, 8)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch's intra-op threads, as a replica with that many CPUs gets them (default: 1, "
                             "as `orchestrator serve`'s replicas)")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch is imported: every thread's default
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(json.dumps(run(args.model, args.tracking_uri, args.requests, args.tokens, args.rounds, args.max_batch)))


if __name__ == "__main__":
    main()
