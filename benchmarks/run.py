"""The orchestrator against a plain script, on this machine: one command, results in docs/benchmarks.md.

    python benchmarks/run.py                      # every benchmark (about 15 minutes on 2 cores)
    python benchmarks/run.py steady fixed         # some of them
    python benchmarks/run.py --smoke --out DIR    # a quick run of each (what the test suite runs)

- steady:  tokens/s of the orchestrator's training loop against HF Trainer + peft
           (benchmarks/hf_trainer.py) on two jobs (the QLoRA quickstart, an fp32 LoRA job with 1
           worker), same model, data, batch, precision, workers and threads; interleaved
           A B B A ..., one ratio per pair.
- fixed:   the quickstart end to end (`orchestrator run`) split into phases, against the same job
           as the plain script; each in a fresh process, as a user runs them; and Ray Train's own
           floor (benchmarks/ray_floor.py: a TorchTrainer whose workers do nothing).
- scaling: tokens/s with 1 and 2 workers and ZeRO 0, 2 and 3; and what reports and checkpoints
           cost at the default and at short intervals.
- search:  trials per hour and the share of trial-steps ASHA saved on jobs/tune-quickstart.yaml.

Each benchmark writes `DIR/<name>.json` (raw figures) and its section of the Markdown report;
without --out the report replaces the results part of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUICKSTART = REPO / "jobs" / "quickstart.yaml"
TUNE_QUICKSTART = REPO / "jobs" / "tune-quickstart.yaml"
DOC = REPO / "docs" / "benchmarks.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
CPUS = os.cpu_count() or 1


# --- running the two sides -------------------------------------------------------------------------


def store_overrides(scratch: Path) -> list[str]:
    """Keep every benchmark run's MLflow store and checkpoints out of the working directory."""
    return [f"tracking.uri=sqlite:///{scratch}/mlflow.db", f"storage.path={scratch}/runs"]


# What each run of a smoke run returned, by side and job. A smoke run checks that every benchmark
# runs and writes its figures; the same job run twice tells it nothing more, so a repeated job
# takes the first run's figures (steady's job is also fixed's plain side and scaling's first row).
_smoke_results: dict[tuple, object] = {}


def _once_in_smoke(smoke: bool, key: tuple, run: Callable[[], object]):
    if not smoke:
        return run()
    if key not in _smoke_results:
        _smoke_results[key] = run()
    return _smoke_results[key]


def orchestrator_in_process(job: Path, overrides: list[str], report_evals: bool = False, smoke: bool = False) -> dict:
    """`run_job` in this process (Ray stays up between runs): the run's summary as JSON."""
    from orchestrator.spec import load_spec
    from orchestrator.training.recipe import run_job

    def run() -> dict:
        summary = run_job(load_spec(job, overrides), report_evals=report_evals)
        return {**summary.to_json(), "tracking_uri": summary.tracking_uri}

    return _once_in_smoke(smoke, ("orchestrator", str(job), tuple(overrides), report_evals), run)


def orchestrator_cli(job: Path, overrides: list[str]) -> tuple[float, dict]:
    """`orchestrator run JOB --json` in a fresh process: its wall time and summary."""
    cmd = [sys.executable, "-m", "orchestrator", "run", str(job), "--json"]
    for o in overrides:
        cmd += ["--set", o]
    return _timed_json(cmd)


def plain(job: Path, overrides: list[str], threads: int, smoke: bool = False) -> tuple[float, dict]:
    """benchmarks/plain_loop.py in a fresh process: its wall time and figures."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "plain_loop.py"), str(job), "--threads", str(threads)]
    for o in overrides:
        cmd += ["--set", o]
    return _once_in_smoke(smoke, ("plain", *cmd), lambda: _timed_json(cmd))


def _timed_json(cmd: list[str]) -> tuple[float, dict]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall, last_json(done.stdout)


def last_json(text: str) -> dict:
    """The JSON object that ends the output (HF Trainer prints a Python dict of its own before it;
    `orchestrator run --json` prints one over several lines)."""
    decoder = json.JSONDecoder()
    for start in reversed([i for i, c in enumerate(text) if c == "{" and (i == 0 or text[i - 1] == "\n")]):
        try:
            obj, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if not text[end:].strip():
            return obj
    raise ValueError(f"no JSON object at the end of the output: {text[-500:]}")


def steady_tokens_per_s(summary: dict) -> float:
    """The orchestrator's training throughput: tokens trained per second of the training loop
    less evaluation and checkpoints (which both sides do alike and are measured apart); the
    per-step logging and progress reporting a plain loop does not do are counted."""
    t = summary["timings"]
    return summary["metrics"]["tokens_trained"] / (t["steps"] + t.get("log", 0.0) + t.get("report", 0.0))


def step_tokens_per_s(summary: dict) -> list[float]:
    """Each training step's own tokens/s (rank 0's `tokens_per_s` metric) from the run's MLflow store."""
    from orchestrator.tracking.runs import run_metric_history

    return [value for _, value in run_metric_history(summary["tracking_uri"], summary["run_id"], "tokens_per_s")]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f}, n={len(values)})"


# --- the benchmarks --------------------------------------------------------------------------------


def steady_job(steps: int) -> list[str]:
    """The quickstart on one worker with every CPU, ZeRO 0, evaluated once at the end."""
    return [f"training.max_steps={steps}", f"training.eval_every={steps}", "training.eval_batches=1",
            "distributed.num_workers=1", f"distributed.cpus_per_worker={CPUS}", "distributed.deepspeed.stage=0"]


def smoke_job() -> list[str]:
    """A smoke run's one in-process run, which steady, scaling's rows and scaling's intervals all
    read: steady's job, evaluated every step and checkpointed every 2 (what the intervals need)."""
    return steady_job(3) + ["training.eval_every=1", "training.checkpoint_every=2"]


# The steady benchmark's two jobs, as `--set` overrides of jobs/quickstart.yaml: the quickstart
# itself (QLoRA, bf16, 2 workers with ZeRO-2 and 1 thread each), and the job issue 19 measured
# against LLaMA-Factory: LoRA r16 on every linear layer, fp32, batch 16, sequence 64, 1 worker
# with every core.
STEADY_JOBS = {
    "qlora-quickstart": [],
    "lora-fp32": ["quantization.bits=null", "model.dtype=float32", "peft.r=16", "peft.alpha=32",
                  "data.max_seq_len=64", "training.micro_batch_size=16", "distributed.num_workers=1",
                  f"distributed.cpus_per_worker={CPUS}", "distributed.deepspeed.stage=0"],
}


def hf_trainer(job: Path, overrides: list[str]) -> dict:
    """benchmarks/hf_trainer.py in fresh processes, one per worker of the job (DDP over gloo under
    torch.distributed.run when there are several), each with the job's threads per worker."""
    from orchestrator.spec import load_spec

    d = load_spec(job, overrides).distributed
    script = [str(REPO / "benchmarks" / "hf_trainer.py"), str(job), "--threads", str(d.cpus_per_worker)]
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(d.num_workers),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())] if d.num_workers > 1 else []
    cmd = [sys.executable, *launcher, *script]
    for o in overrides:
        cmd += ["--set", o]
    return _timed_json(cmd)[1]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_steady(scratch: Path, smoke: bool) -> dict:
    """The orchestrator against HF Trainer + peft on each of STEADY_JOBS, interleaved A B B A ...
    Two figures per pair: the whole training loop's tokens/s (what the target is about; the
    first step's start to the last step's end, evaluation excluded), and the ratio of the median
    step's tokens/s, which a few slow seconds of a shared machine move far less."""
    steps, reps = (3, 1) if smoke else (60, 4)
    # A smoke run checks the code on the one-worker quickstart (each side of it runs once in a
    # smoke run; the orchestrator's run is the one scaling's smoke run reads too).
    jobs = {"quickstart-1-worker": []} if smoke else STEADY_JOBS
    results = {}
    for job, overrides in jobs.items():
        common = steady_job(steps) if smoke else overrides + [f"training.max_steps={steps}"]
        pairs = []
        for rep in range(reps):
            order = ("orchestrator", "hf") if rep % 2 == 0 else ("hf", "orchestrator")
            result = {}
            for side in order:
                if side == "hf":
                    figures = hf_trainer(QUICKSTART, common)
                    result["hf"] = figures["tokens_per_s"]
                    result["hf_step_median"] = statistics.median(figures["step_tokens_per_s"])
                else:
                    ours = smoke_job() if smoke else common + [f"training.eval_every={steps}", "training.eval_batches=1"]
                    summary = orchestrator_in_process(QUICKSTART, ours + store_overrides(scratch), smoke=smoke)
                    result["orchestrator"] = steady_tokens_per_s(summary)
                    result["orchestrator_step_median"] = statistics.median(step_tokens_per_s(summary))
            result["ratio"] = result["orchestrator"] / result["hf"]
            result["step_ratio"] = result["orchestrator_step_median"] / result["hf_step_median"]
            pairs.append(result)
        results[job] = {"overrides": overrides, "pairs": pairs,
                        "ratio_median": statistics.median(p["ratio"] for p in pairs),
                        "ratio_spread": spread([p["ratio"] for p in pairs]),
                        "step_ratio_spread": spread([p["step_ratio"] for p in pairs])}
    return {"steps": steps, "jobs": results, "load_after": load_average()}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def bench_fixed(scratch: Path, smoke: bool) -> dict:
    from orchestrator.spec import load_spec

    # A smoke run: steady's job, one worker (and one in Ray Train's floor; they start in half the time
    # of two on 2 cores, and the scaling smoke run still runs the quickstart's two), its plain side
    # the run steady made.
    overrides = steady_job(3) if smoke else []
    reps = 1 if smoke else 3
    runs = []
    workers = load_spec(QUICKSTART, overrides).distributed.num_workers
    floor_cmd = [sys.executable, str(REPO / "benchmarks" / "ray_floor.py"), "--workers", str(workers)]
    for rep in range(reps):
        plain_wall, plain_figures = plain(QUICKSTART, overrides, threads=CPUS, smoke=smoke)
        orch_wall, summary = orchestrator_cli(QUICKSTART, overrides + store_overrides(scratch / f"fixed{rep}"))
        floor_wall, floor = _timed_json(floor_cmd)
        runs.append({"plain_wall_s": plain_wall, "plain": plain_figures,
                     "orchestrator_wall_s": orch_wall, "orchestrator": summary["timings"],
                     "eval_loss": summary["metrics"]["eval_loss"], "ray_floor_wall_s": floor_wall, "ray_floor": floor})
    return {"runs": runs, "workers": workers,
            "ratio_median": statistics.median(r["orchestrator_wall_s"] / r["plain_wall_s"] for r in runs),
            "extra_s_median": statistics.median(r["orchestrator_wall_s"] - r["plain_wall_s"] for r in runs),
            "ray_floor_s_median": statistics.median(r["ray_floor_wall_s"] for r in runs)}


SCALING = [(1, 0), (2, 0), (2, 2), (2, 3)]  # (workers, ZeRO stage)


def bench_scaling(scratch: Path, smoke: bool) -> dict:
    steps = 3 if smoke else 30
    cases = SCALING[:1] if smoke else SCALING
    rows = []
    for workers, stage in cases:
        overrides = smoke_job() if smoke else [  # a smoke run: steady's run, already made
            f"training.max_steps={steps}", f"training.eval_every={steps}", "training.eval_batches=1",
            f"distributed.num_workers={workers}", f"distributed.cpus_per_worker={max(1, CPUS // workers)}",
            f"distributed.deepspeed.stage={stage}"]
        summary = orchestrator_in_process(QUICKSTART, overrides + store_overrides(scratch), smoke=smoke)
        t = summary["timings"]
        rows.append({"workers": workers, "stage": stage,
                     "tokens_per_s": steady_tokens_per_s(summary),
                     "setup_s": t.get("setup"), "worker_start_s": t.get("worker_start")})
    intervals = []
    # (label, overrides, report every evaluation to Ray Train as a search does)
    interval_cases = [("eval 50, no checkpoints (the default)", ["training.max_steps=100"], False),
                      ("eval 50 reported to Ray (as in a search)", ["training.max_steps=100"], True),
                      ("eval 10, checkpoint 10", ["training.max_steps=100", "training.eval_every=10",
                                                  "training.checkpoint_every=10"], False)]
    if smoke:  # steady's run again, already made
        interval_cases = [("eval 1, checkpoint 2", smoke_job(), False)]
    for label, extra, report_evals in interval_cases:
        summary = orchestrator_in_process(QUICKSTART, extra + store_overrides(scratch), report_evals, smoke=smoke)
        t = summary["timings"]
        intervals.append({"intervals": label, "steps_s": t["steps"], "report_s": t.get("report", 0.0),
                          "checkpoint_s": t.get("checkpoint", 0.0) + t.get("finish", 0.0),
                          "log_s": t.get("log", 0.0),
                          "share_of_step_time": (t.get("report", 0.0) + t.get("checkpoint", 0.0)
                                                 + t.get("log", 0.0)) / t["steps"]})
    return {"steps": steps, "rows": rows, "intervals": intervals}


def bench_search(scratch: Path, smoke: bool) -> dict:
    """The tune quickstart as a user runs it; trial-steps as each trial's last reported step."""
    from orchestrator.spec import load_spec

    overrides = store_overrides(scratch / "search")
    if smoke:
        overrides += ["tune.num_samples=2", "training.max_steps=4", "training.eval_every=2"]
    total = load_spec(TUNE_QUICKSTART, overrides).training.max_steps
    wall, summary = orchestrator_cli(TUNE_QUICKSTART, overrides)
    trials = summary["trials"]
    steps_run = sum(t["step"] or 0 for t in trials)
    states = {state: sum(t["state"] == state for t in trials) for state in {t["state"] for t in trials}}
    return {"wall_s": wall, "trials": len(trials), "states": states, "steps_per_trial": total,
            "trial_steps_run": steps_run, "trial_steps_all_to_the_end": total * len(trials),
            "saved_share": 1 - steps_run / (total * len(trials)), "trials_per_hour": len(trials) / wall * 3600,
            "best_eval_loss": summary["metrics"].get("eval_loss")}


BENCHMARKS = {"steady": bench_steady, "fixed": bench_fixed, "scaling": bench_scaling, "search": bench_search}


# --- the report ------------------------------------------------------------------------------------


def render(results: dict, smoke: bool) -> str:
    lines = [f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {CPUS} CPU cores "
             f"({platform.processor() or platform.machine()}), no GPU{' — SMOKE RUN, not results' if smoke else ''}. "
             f"Load average before the run: {results.get('load_before', '?')}.", ""]
    if "steady" in results:
        r = results["steady"]
        lines += ["### Steady-state throughput against HF Trainer + peft", "",
                  f"{r['steps']} steps per run; each pair runs the orchestrator (`run_job`, Ray Train + DeepSpeed) "
                  "and `benchmarks/hf_trainer.py` (transformers' Trainer, DDP over gloo under "
                  "`torch.distributed.run` when the job has several workers) on the same model, data, batch, "
                  "precision, workers and threads, interleaved A B B A. Tokens/s: real tokens of the training "
                  "loop over its seconds (evaluation excluded on both sides). Load average after the runs: "
                  f"{r.get('load_after', '?')}.", ""]
        for job, j in r["jobs"].items():
            lines += [f"**{job}** (jobs/quickstart.yaml{' with ' + ', '.join(j['overrides']) if j['overrides'] else ''})",
                      "", "| pair | orchestrator tokens/s | HF Trainer tokens/s | ratio | median step: orchestrator "
                      "| HF Trainer | ratio |", "|---|---|---|---|---|---|---|"]
            lines += [f"| {i + 1} | {p['orchestrator']:.0f} | {p['hf']:.0f} | {p['ratio']:.3f} | "
                      f"{p['orchestrator_step_median']:.0f} | {p['hf_step_median']:.0f} | {p['step_ratio']:.3f} |"
                      for i, p in enumerate(j["pairs"])]
            lines += ["", f"Ratio orchestrator / HF Trainer: **{j['ratio_spread']}**; "
                          f"median step's tokens/s: {j['step_ratio_spread']}.", ""]
    if "fixed" in results:
        r = results["fixed"]
        runs = r["runs"]

        def med(side: str, key: str):  # each figure: its median over the runs
            values = [x[side].get(key) if side else x[key] for x in runs]
            values = [v for v in values if v is not None]
            return statistics.median(values) if values else None

        first = list(runs[0]["orchestrator"])
        later = sorted({k for x in runs for k in x["orchestrator"]} - set(first))
        o = {k: med("orchestrator", k) for k in first + later}
        p = {k: med("plain", k) for k in runs[0]["plain"] if isinstance(runs[0]["plain"][k], (int, float))}
        run = {"orchestrator_wall_s": med("", "orchestrator_wall_s"), "plain_wall_s": med("", "plain_wall_s")}
        lines += ["### Fixed costs: the quickstart end to end", "",
                  f"Each figure is the median of {len(runs)} runs (plain, orchestrator, plain, orchestrator ...).", "",
                  "| phase | orchestrator (s) | plain script (s) |", "|---|---|---|"]
        plain_of = {"resolve_base": p.get("time_load_s"), "data": p.get("time_data_s"), "steps": p.get("time_steps_s"),
                    "eval": p.get("time_eval_s"), "checkpoint": p.get("time_checkpoint_s")}
        for phase, seconds in o.items():
            if phase == "total":
                continue
            other = plain_of.get(phase)
            lines.append(f"| {phase} | {seconds:.1f} | {'' if other is None else f'{other:.1f}'} |")
        lines += [f"| imports, process start (plain) / CLI start-up (orchestrator) | "
                  f"{run['orchestrator_wall_s'] - o['total']:.1f} | {p.get('time_import_s', 0):.1f} |",
                  f"| **wall time of the process** | **{run['orchestrator_wall_s']:.1f}** | **{run['plain_wall_s']:.1f}** |",
                  "", f"End-to-end ratio (median of {len(r['runs'])}): **{r['ratio_median']:.2f}**; "
                  f"the orchestrator's extra wall time: **{r['extra_s_median']:.1f} s** (each pair: "
                  + ", ".join(f"{x['orchestrator_wall_s'] - x['plain_wall_s']:.1f}" for x in runs) + " s).", ""]
        if "ray_floor_s_median" in r:
            f = {k: med("ray_floor", k) for k in runs[0]["ray_floor"]}
            lines += [f"Ray Train's own floor on this machine (`benchmarks/ray_floor.py`: a TorchTrainer with "
                      f"{r['workers']} workers whose function does nothing, run after each pair): "
                      f"**{r['ray_floor_s_median']:.1f} s** of wall time (ray.init {f['ray_init_s']:.1f} s, "
                      f"workers started {f['worker_start_s']:.1f} s, end of fit {f['finish_s']:.1f} s, "
                      f"ray.shutdown {f['shutdown_s']:.1f} s, the rest Python start-up and exit).", ""]
    if "scaling" in results:
        r = results["scaling"]
        lines += ["### Scaling", "", f"{r['steps']} steps each; tokens/s of the training loop, all workers together.",
                  "", "| workers | ZeRO | tokens/s | worker start (s) | model load + DeepSpeed init (s) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {x['workers']} | {x['stage']} | {x['tokens_per_s']:.0f} | {x['worker_start_s']:.1f} | "
                  f"{x['setup_s']:.1f} |" for x in r["rows"]]
        lines += ["", "| intervals | steps (s) | logging (s) | reports (s) | checkpoints (s) | share of step time |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {x['intervals']} | {x['steps_s']:.1f} | {x['log_s']:.2f} | {x['report_s']:.2f} | "
                  f"{x['checkpoint_s']:.2f} | {100 * x['share_of_step_time']:.1f}% |" for x in r["intervals"]]
        lines.append("")
    if "search" in results:
        r = results["search"]
        states = ", ".join(f"{n} {state}" for state, n in sorted(r["states"].items()))
        lines += ["### Search efficiency: jobs/tune-quickstart.yaml", "",
                  f"{r['trials']} trials ({states}) in {r['wall_s']:.0f} s: **{r['trials_per_hour']:.0f} trials per "
                  f"hour**. ASHA ran {r['trial_steps_run']} trial-steps of the {r['trial_steps_all_to_the_end']} that "
                  f"running every trial to step {r['steps_per_trial']} takes: **{100 * r['saved_share']:.0f}% saved**. "
                  f"Best eval loss {r['best_eval_loss']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"some of: {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--smoke", action="store_true", help="a few steps each: checks the benchmarks run")
    parser.add_argument("--out", type=Path, default=None, help="write results here, not to docs/benchmarks.md")
    args = parser.parse_args(argv)
    # A smoke run leaves the search out unless asked: tests/test_search_run.py already runs a real
    # small search through the same code path in the suite.
    names = args.names or [n for n in BENCHMARKS if not (args.smoke and n == "search")]
    if unknown := set(names) - set(BENCHMARKS):
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}: choose from {', '.join(BENCHMARKS)}")
    out = args.out or REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)

    import ray

    from orchestrator.training import launch

    ours = not ray.is_initialized()  # stop Ray at the end only if these benchmarks started it
    results = {"load_before": load_average()}
    with tempfile.TemporaryDirectory() as scratch:
        try:
            for name in names:
                if name == "fixed" and ours:
                    # The quickstart runs as a user runs it, on a machine where no other Ray
                    # instance (this process's, left by `steady`) competes for the CPUs.
                    launch.shutdown()
                print(f"benchmark {name} ...", file=sys.stderr, flush=True)
                results[name] = BENCHMARKS[name](Path(scratch), args.smoke)
                (out / f"{name}.json").write_text(json.dumps(results[name], indent=2))
        finally:
            if ours:
                launch.shutdown()
    report = render(results, args.smoke)
    (out / "report.md").write_text(report)
    if args.out is None:
        text = DOC.read_text()
        DOC.write_text(text[:text.index(START) + len(START)] + "\n" + report + "\n" + text[text.index(END):])
    print(report)
    return results


if __name__ == "__main__":
    main()
