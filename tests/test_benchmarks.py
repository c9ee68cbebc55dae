"""The benchmarks stay runnable: a smoke run of each (a few steps), checked for sane figures.

Timings are never asserted here; `docs/benchmarks.md` holds the measured results."""

from __future__ import annotations

import importlib.util
import json
import math

from conftest import REPO


def load_benchmarks():
    spec = importlib.util.spec_from_file_location("benchmarks_run", REPO / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmarks_smoke_run_writes_every_figure(tmp_path, ray_local, tiny_base):
    bench = load_benchmarks()
    results = bench.main(["--smoke", "--out", str(tmp_path)])

    for name in ("steady", "fixed", "scaling"):
        assert json.loads((tmp_path / f"{name}.json").read_text()) == json.loads(json.dumps(results[name]))
    # A smoke run measures the cheaper of the two jobs: one pair, the orchestrator against HF Trainer.
    assert list(results["steady"]["jobs"]) == ["quickstart-1-worker"]
    steady = results["steady"]["jobs"]["quickstart-1-worker"]["pairs"][0]
    assert steady["orchestrator"] > 0 and steady["hf"] > 0
    assert math.isclose(steady["ratio"], steady["orchestrator"] / steady["hf"])

    fixed = results["fixed"]["runs"][0]
    phases = fixed["orchestrator"]
    # Every phase of a run is accounted for, and they add up to less than the process's wall time.
    for phase in ("ray_start", "worker_start", "setup", "steps", "eval", "register"):
        assert phases[phase] > 0, phase
    assert phases["total"] < fixed["orchestrator_wall_s"]
    assert fixed["plain"]["steps"] == 3 and fixed["plain"]["tokens_trained"] > 0
    # Ray Train's floor: its phases are real and fit inside the process's wall time.
    floor = fixed["ray_floor"]
    assert floor["ray_init_s"] > 0 and floor["worker_start_s"] > 0 and floor["wall_s"] < fixed["ray_floor_wall_s"]
    assert steady["step_ratio"] > 0 and len(results["steady"]["jobs"]["quickstart-1-worker"]["pairs"]) == 1

    intervals = results["scaling"]["intervals"][0]
    # Eval every step, checkpoint every 2 over 4 steps: checkpoints and logging took time, and evaluations
    # were not reported to Ray Train (only a search needs them there).
    assert intervals["checkpoint_s"] > 0 and intervals["log_s"] > 0 and intervals["report_s"] == 0

    report = (tmp_path / "report.md").read_text()
    assert "SMOKE RUN" in report and "Steady-state throughput against HF Trainer" in report and "| register |" in report and "Ray Train's own floor" in report
    # Without --out the report goes into docs/benchmarks.md; a smoke run never touches it.
    assert "SMOKE RUN" not in (REPO / "docs" / "benchmarks.md").read_text()


def test_gpu_throughput_script_plans_its_cases_without_a_gpu():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "throughput_gpu.py"), "--dry-run"],
                          capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["1b-qlora", "8b-qlora"]
    # 8B: 6 x 8.03e9 parameters + 12 x 32 layers x 4096 x 2048 = 51.4 GFLOPs per token.
    assert "51.4 GFLOPs per token" in lines[1]
