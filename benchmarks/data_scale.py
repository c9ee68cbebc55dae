"""Data at scale: the quickstart job on a generated Alpaca file of many records, as a user runs it.

    python benchmarks/data_scale.py                  # 30,000 and 300,000 records (about 7 minutes on 2 cores)
    python benchmarks/data_scale.py --records 2000 --small 1000 --steps 3   # a quick run

Each run is `orchestrator run jobs/quickstart.yaml --json` in a fresh process with `data.train` set to
the generated file, sampled every 0.2 s with psutil: the driver's peak memory (resident set of the
CLI process), and each Ray Train worker's and the train controller's peak (resident and unique set:
the Ray object store's shared pages count in the first, not the second). Also: how long the data
took to tokenize (records per second), when the first training step came (from the run's MLflow
metric history) against when the workers started and when tokenizing ended (the cache entry's
`meta.json`, written last), and real (non-pad) tokens per second of training with and without
`data.packing`. The large file's first run trains while it is tokenized (the default,
`data.train_while_tokenizing`); a second first run, with a cache of its own, tokenizes it all
before training, as a search or an `epochs` job does.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
QUICKSTART = REPO / "jobs" / "quickstart.yaml"

# A word list with the shape of English text: short function words often, longer words rarely.
_WORDS = ("the of and to in is that it for was on are as with his they at be this from have or by one had not "
          "but what all were when we there can an your which their said if do will each about how up out them "
          "then she many some so these would other into has more her two like him see time could no make than "
          "first been its who now people my made over did down only way find use may water long little very "
          "after words called just where most know river mountain animal describe summarise translate answer "
          "question reason because although between different important example language instruction").split()


def make_alpaca(path: Path, records: int, seed: int = 0) -> Path:
    """`records` Alpaca records with 5-180 words each (instruction, optional input, output), seeded."""
    rng = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(n)).capitalize() + "."

    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(records):
            total = rng.randint(5, 180)
            instruction = rng.randint(2, min(30, total - 2))
            given = rng.randint(0, (total - instruction) // 2) if rng.random() < 0.4 else 0
            fh.write(json.dumps({"instruction": words(instruction), "input": words(given) if given else "",
                                 "output": words(total - instruction - given)}) + "\n")
    return path


class Sampler(threading.Thread):
    """Peak memory of a process tree, by role, sampled every `interval_s` seconds."""

    ROLES = {"RayTrainWorker": "worker", "TrainController": "controller"}

    def __init__(self, pid: int, interval_s: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.interval_s = pid, interval_s
        self.peaks: dict[str, dict[str, int]] = {}  # key -> {"rss": .., "uss": ..}
        self.first_seen: dict[str, float] = {}
        self._done = threading.Event()

    def role(self, proc) -> str | None:
        if proc.pid == self.pid:
            return "driver"
        try:
            cmd = " ".join(proc.cmdline())
        except Exception:
            return None
        return next((f"{role}:{proc.pid}" for marker, role in self.ROLES.items() if marker in cmd), None)

    def run(self) -> None:
        import psutil

        root = psutil.Process(self.pid)
        while not self._done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for proc in procs:
                key = self.role(proc)
                if key is None:
                    continue
                try:
                    mem = proc.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                self.first_seen.setdefault(key, time.time())
                peak = self.peaks.setdefault(key, {"rss": 0, "uss": 0})
                peak["rss"], peak["uss"] = max(peak["rss"], mem.rss), max(peak["uss"], mem.uss)
            time.sleep(self.interval_s)

    def stop(self) -> None:
        self._done.set()
        self.join()


def run_job(data_file: Path, scratch: Path, steps: int, packing: bool, max_seq_len: int, cache_home: Path,
            while_tokenizing: bool = True) -> dict:
    """`orchestrator run` on the quickstart with `data_file`, sampled; the figures of one run.
    `cache_home`: the runs' XDG_CACHE_HOME (their own tokenized-data cache)."""
    overrides = [f"data.train={data_file}", f"training.max_steps={steps}", f"training.eval_every={steps}",
                 "training.eval_batches=2", f"data.packing={str(packing).lower()}", f"data.max_seq_len={max_seq_len}",
                 f"data.train_while_tokenizing={str(while_tokenizing).lower()}",
                 f"tracking.uri=sqlite:///{scratch}/mlflow.db", f"storage.path={scratch}/runs"]
    cmd = [sys.executable, "-m", "orchestrator", "run", str(QUICKSTART), "--json"]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "XDG_CACHE_HOME": str(cache_home)}
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    sampler = Sampler(proc.pid)
    sampler.start()
    out, err = proc.communicate()
    sampler.stop()
    wall = time.time() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    summary = json.loads(out[out.index("{"):])
    first_step_at = _first_step_time(f"sqlite:///{scratch}/mlflow.db", summary["run_id"])
    workers = {k: v for k, v in sampler.peaks.items() if k.startswith("worker:")}
    workers_started = min((sampler.first_seen[k] for k in workers), default=None)
    t = summary["timings"]
    tokenized = _tokenized_in_run(cache_home, started)
    return {
        "records_file_mb": data_file.stat().st_size / 2**20, "packing": packing, "wall_s": wall,
        "driver_peak_rss_mb": sampler.peaks.get("driver", {}).get("rss", 0) / 2**20,
        "worker_peak_rss_mb": [v["rss"] / 2**20 for v in workers.values()],
        "worker_peak_uss_mb": [v["uss"] / 2**20 for v in workers.values()],
        "controller_peak_rss_mb": [v["rss"] / 2**20 for k, v in sampler.peaks.items() if k.startswith("controller:")],
        "data_s": t.get("data"), "timings": t, "data_stats": summary.get("data", {}),
        "first_step_after_start_s": None if first_step_at is None else first_step_at - started,
        "first_step_after_workers_s": None if first_step_at is None or workers_started is None
        else first_step_at - workers_started,
        # Tokenized in this run: how long it took, and when it ended against the first step.
        "tokenize_s": tokenized and tokenized[1],
        "tokenized_after_first_step_s": None if not tokenized or first_step_at is None else tokenized[0] - first_step_at,
        "real_tokens_per_s": summary["metrics"].get("tokens_trained", 0) / max(1e-9, t.get("steps", 0.0)),
        "eval_loss": summary["metrics"].get("eval_loss"),
        "real_token_share": _mean_real_token_share(f"sqlite:///{scratch}/mlflow.db", summary["run_id"]),
    }


def _tokenized_in_run(cache_home: Path, started: float) -> tuple[float, float] | None:
    """(when it ended, seconds it took) for the data set the run tokenized: the cache entry whose
    `meta.json` (written when tokenizing ends) is newer than the run's start; None when the run's
    data came from the cache."""
    for meta in (cache_home / "orchestrator" / "tokenized").glob("*/meta.json"):
        if meta.stat().st_mtime > started:
            return meta.stat().st_mtime, json.loads(meta.read_text())["tokenize_s"]
    return None


def _first_step_time(tracking_uri: str, run_id: str) -> float | None:
    """When the run logged its first training step (epoch seconds), from its metric history."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri).get_metric_history(run_id, "train_loss")
    return min((m.timestamp / 1000 for m in history if m.step == 1), default=None)


def _mean_real_token_share(tracking_uri: str, run_id: str) -> float | None:
    """The share of real tokens in rank 0's batches, averaged over every step (the summary has the last step's)."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri).get_metric_history(run_id, "real_token_share")
    return sum(m.value for m in history) / len(history) if history else None


DOC = REPO / "docs" / "benchmarks.md"
START, END = "<!-- data:start -->", "<!-- data:end -->"


def render(r: dict, records: int, small: int, steps: int, max_seq_len: int) -> str:
    def mb(values) -> str:
        return ", ".join(f"{v:.0f}" for v in values) if isinstance(values, list) else f"{values:.0f}"

    lines = [f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} CPU cores, no GPU; "
             f"load average before: {' '.join(f'{x:.2f}' for x in r['load_before'])}. The quickstart job "
             f"(2 workers, ZeRO-2, QLoRA) at `data.max_seq_len: {max_seq_len}` for {steps} steps on generated Alpaca files of {small:,} and {records:,} "
             "records (5-180 words each), each run `orchestrator run` in a fresh process.", "",
             "| run | file (MB) | wall (s) | driver peak RSS (MB) | worker peak RSS (MB) | worker peak USS (MB) | "
             "train controller RSS (MB) | data phase (s) | tokenizing (s) | first step after workers start (s) | "
             "real tokens/s | real-token share (mean of the steps) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, label in [("small", f"{small:,} records"), ("big_first", f"{records:,}, trained while tokenized"),
                        ("big_whole", f"{records:,}, tokenized first"),
                        ("big_cached", f"{records:,}, cached"), ("big_packed", f"{records:,}, packed")]:
        x = r[name]
        share = "" if x["real_token_share"] is None else f"{x['real_token_share']:.2f}"
        tokenize = "" if not x.get("tokenize_s") else f"{x['tokenize_s']:.1f}"
        lines.append(f"| {label} | {x['records_file_mb']:.0f} | {x['wall_s']:.0f} | {x['driver_peak_rss_mb']:.0f} | "
                     f"{mb(x['worker_peak_rss_mb'])} | {mb(x['worker_peak_uss_mb'])} | {mb(x['controller_peak_rss_mb'])} | "
                     f"{x['data_s']:.1f} | {tokenize} | {x['first_step_after_workers_s']:.1f} | "
                     f"{x['real_tokens_per_s']:.0f} | {share} |")
    whole, first = r["big_whole"], r["big_first"]
    lines += ["", f"Tokenization: {records / whole['data_s']:,.0f} records/s ({records:,} records in {whole['data_s']:.1f} s, "
              "the data phase of the run that tokenized first). Worker memory growth from the small to the large file (peak USS): "
              f"**{100 * (r['worker_growth'] - 1):+.0f}%**. Packing: **{r['packing_speedup']:.2f}x** the real tokens/s "
              "of padded batches."]
    if first.get("tokenized_after_first_step_s") is not None:
        gap = first["tokenized_after_first_step_s"]
        when = (f"**{gap:.1f} s before tokenizing ended**" if gap > 0 else
                f"{-gap:.1f} s after tokenizing ended (the file took less time than the workers' start)")
        lines += ["", f"Training while tokenized: the first step came {first['first_step_after_workers_s']:.1f} s after the "
                  f"workers started and {when}; tokenizing took {first['tokenize_s']:.1f} s beside the workers, and "
                  f"the run {first['wall_s']:.0f} s in all, against {whole['wall_s']:.0f} s for tokenizing first."]
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=300_000)
    parser.add_argument("--small", type=int, default=30_000, help="the smaller file, for memory growth")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--max-seq-len", type=int, default=512,
                        help="tokens per row; the generated records are about 270 tokens on average, 1%% longer than 512")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        # A tokenized-data cache of the benchmark's own (the first run of the large file must
        # tokenize it), beside the user's built-in bases (not built again).
        from orchestrator.planning.catalogue import cache_root, default_cache_dir

        default_cache_dir().mkdir(parents=True, exist_ok=True)

        def cache_home(name: str) -> Path:
            home = scratch / name
            if not home.exists():
                (home / cache_root().name).mkdir(parents=True)
                (home / cache_root().name / default_cache_dir().name).symlink_to(default_cache_dir())
            return home

        big = make_alpaca(scratch / f"alpaca-{args.records}.jsonl", args.records)
        small = make_alpaca(scratch / f"alpaca-{args.small}.jsonl", args.small, seed=1)
        # (name, file, packing, cache home, train while tokenizing)
        for name, data_file, packing, home, streamed in [
                ("small", small, False, "cache-home", True), ("big_first", big, False, "cache-home", True),
                ("big_whole", big, False, "cache-home-2", False), ("big_cached", big, False, "cache-home", True),
                ("big_packed", big, True, "cache-home", True)]:
            print(f"data benchmark: {name} ...", file=sys.stderr, flush=True)
            results[name] = run_job(data_file, scratch / name, args.steps, packing, args.max_seq_len, cache_home(home),
                                    while_tokenizing=streamed)
    results["worker_growth"] = (max(results["big_cached"]["worker_peak_uss_mb"])
                                / max(results["small"]["worker_peak_uss_mb"]))
    results["packing_speedup"] = results["big_packed"]["real_tokens_per_s"] / results["big_cached"]["real_tokens_per_s"]
    (args.out / "data_scale.json").write_text(json.dumps(results, indent=2))
    report = render(results, args.records, args.small, args.steps, args.max_seq_len)
    if args.out == REPO / "benchmarks" / "results":  # a full run: its section of docs/benchmarks.md
        text = DOC.read_text()
        if START not in text:
            text += f"\n## Data at scale (`benchmarks/data_scale.py`)\n\n{START}\n{END}\n"
        DOC.write_text(text[:text.index(START) + len(START)] + "\n" + report + "\n" + text[text.index(END):])
    print(report)
    return results


if __name__ == "__main__":
    main()
