"""`orchestrator compare`: the same job trained with several PEFT methods, side by side.

job file + method presets -> one spec per method (validated together before anything runs) ->
each trained in turn through `run_job` (one Ray instance, one MLflow child run per method under
a parent run) -> one table (trainable parameters, planned and measured peak memory, tokens/s,
final eval loss, wall time, artifact size) and one plot of eval loss against step.
Nothing is registered: compare is for choosing; the winner is run with `orchestrator run`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from orchestrator.spec import METHOD_FIELDS, JobSpec, Problem, SpecError, load_spec

# Each preset is a set of `--set` overrides on the job file. The learning rates were chosen on
# the quickstart task (50 steps, the rates tried in brackets, eval loss from 3.9):
#   prompt_tuning 1e-1 (3e-2: 3.03, 1e-1: 1.33, 3e-1: 1.03)   prefix_tuning 3e-2 (0.95; 1e-1: 0.77)
#   adaption_prompt 3e-2 (0.85; 1e-1: 0.77)   ia3 1e-1 (3e-2: 0.29, 1e-1: 0.07)
#   freeze 3e-3 (1e-3: 0.77, 3e-3: 0.27)   full 1e-3 (0.09)   lora: the job's own 2e-3 (0.29)
# Methods that train a few thousand numbers far from their optimum want 10-50x the LoRA rate.
# The user's own --set comes last and wins (e.g. --set training.learning_rate=... for all).
METHOD_PRESETS: dict[str, dict[str, object]] = {
    "lora": {"peft.method": "lora", "quantization.bits": None},
    "qlora": {"peft.method": "lora", "quantization.bits": 4},
    "dora": {"peft.method": "lora", "peft.use_dora": True, "quantization.bits": None},
    "ia3": {"peft.method": "ia3", "quantization.bits": None, "training.learning_rate": 1e-1},
    "prompt_tuning": {"peft.method": "prompt_tuning", "peft.num_virtual_tokens": 20, "quantization.bits": None,
                      "training.learning_rate": 1e-1},
    "prefix_tuning": {"peft.method": "prefix_tuning", "peft.num_virtual_tokens": 20, "quantization.bits": None,
                      "training.learning_rate": 3e-2},
    "adaption_prompt": {"peft.method": "adaption_prompt", "peft.adapter_len": 10, "quantization.bits": None,
                        "training.learning_rate": 3e-2},
    "freeze": {"peft.method": "freeze", "peft.last_n_layers": 1, "quantization.bits": None,
               "training.learning_rate": 3e-3},
    "full": {"peft.method": "full", "quantization.bits": None, "training.learning_rate": 1e-3},
}
DEFAULT_METHODS = ("lora", "qlora", "ia3", "prompt_tuning", "prefix_tuning", "adaption_prompt", "freeze", "full")
TABLE_FILE, MARKDOWN_FILE, PLOT_FILE, JSON_FILE = "compare.csv", "compare.md", "eval_loss.png", "compare.json"


def _yaml_value(value: object) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def preset_overrides(method: str, name: str) -> list[str]:
    """The `--set` overrides that turn a job into its `method` variant: the other methods' fields
    cleared, the preset applied, registration kept to what every method can do."""
    preset = METHOD_PRESETS[method]
    owned = METHOD_FIELDS.get(str(preset["peft.method"]), ())
    cleared = {f"peft.{f}": False if f.startswith("use_") else None
               for fields in METHOD_FIELDS.values() for f in fields if f not in owned}
    sets = {**cleared, "registry.mode": "adapter", "name": f"{name}-{method}", **preset}
    return [f"{k}={_yaml_value(v)}" for k, v in sets.items()]


def run_command(job: str | Path, method: str, overrides: list[str]) -> str:
    """The `orchestrator run` line that trains and registers one method of a comparison."""
    sets = [f"{k}={_yaml_value(v)}" for k, v in METHOD_PRESETS[method].items()] + list(overrides)
    return f"orchestrator run {job} " + " ".join(f"--set {s}" for s in sets)


def method_specs(job: str | Path, methods: list[str], overrides: list[str]) -> dict[str, JobSpec]:
    """One validated spec per method, or one `SpecError` listing every method's problems."""
    unknown = [m for m in methods if m not in METHOD_PRESETS]
    if unknown or not methods:
        raise SpecError([Problem(path="--methods", message=f"unknown method(s) {', '.join(unknown) or '(none)'}",
                                 fix=f"choose from {', '.join(METHOD_PRESETS)}")])
    name = load_spec(job, overrides).name
    specs, problems = {}, []
    for method in methods:
        try:
            specs[method] = load_spec(job, preset_overrides(method, name) + list(overrides))
        except SpecError as e:
            problems += [Problem(path=f"[{method}] {p.path}", message=p.message, fix=p.fix) for p in e.problems]
    if problems:
        raise SpecError(problems, str(job))
    return specs


@dataclass
class MethodResult:
    method: str
    run_id: str = ""
    trainable_params: int = 0
    total_params: int = 0
    planned_peak_bytes: int = 0
    measured_peak_bytes: float | None = None
    tokens_per_s: float | None = None
    base_eval_loss: float | None = None
    final_eval_loss: float | None = None
    wall_s: float = 0.0
    artifact_bytes: int = 0
    eval_history: list[tuple[int, float]] = field(default_factory=list)
    error: str = ""

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0


@dataclass
class Comparison:
    parent_run_id: str
    experiment: str
    tracking_uri: str
    out_dir: str
    memory_kind: str  # what "measured peak" means on this machine
    results: list[MethodResult]

    def to_json(self) -> dict:
        return {"parent_run_id": self.parent_run_id, "experiment": self.experiment, "out_dir": self.out_dir,
                "measured_peak_memory": self.memory_kind,
                "methods": [{**asdict(r), "trainable_share": r.trainable_share} for r in self.results]}


COLUMNS = ("method", "trainable", "share", "planned peak", "measured peak", "tokens/s", "eval loss", "wall",
           "artifact")


def table_rows(results: list[MethodResult]) -> list[tuple[str, ...]]:
    """The table as text cells, in COLUMNS order (pure: the console, CSV-free markdown and the
    README show the same cells)."""
    from orchestrator.planning.units import count, human

    def loss(r: MethodResult) -> str:
        if r.final_eval_loss is None:
            return "-"
        return f"{r.base_eval_loss:.3f} -> {r.final_eval_loss:.3f}" if r.base_eval_loss else f"{r.final_eval_loss:.3f}"

    rows = []
    for r in results:
        if r.error:
            rows.append((r.method, "failed: " + r.error[:60], *("",) * (len(COLUMNS) - 2)))
            continue
        rows.append((r.method, count(r.trainable_params), f"{r.trainable_share:.3%}", human(r.planned_peak_bytes),
                     human(r.measured_peak_bytes) if r.measured_peak_bytes else "-",
                     f"{r.tokens_per_s:,.0f}" if r.tokens_per_s else "-", loss(r), f"{r.wall_s:.0f} s",
                     human(r.artifact_bytes)))
    return rows


def markdown_table(results: list[MethodResult]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    return "\n".join(lines) + "\n"


def csv_table(results: list[MethodResult]) -> str:
    """Raw numbers, one row per method (bytes, seconds, losses unrounded)."""
    buf = io.StringIO()
    names = ["method", "trainable_params", "total_params", "trainable_share", "planned_peak_bytes",
             "measured_peak_bytes", "tokens_per_s", "base_eval_loss", "final_eval_loss", "wall_s", "artifact_bytes",
             "run_id", "error"]
    writer = csv.writer(buf)
    writer.writerow(names)
    for r in results:
        writer.writerow([r.trainable_share if n == "trainable_share" else getattr(r, n) for n in names])
    return buf.getvalue()


def plot_eval_loss(results: list[MethodResult], path: Path, title: str) -> Path:
    """Eval loss against step, one line per method, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for r in results:
        if r.eval_history:
            steps, values = zip(*r.eval_history)
            ax.plot(steps, values, marker="o", markersize=3, label=r.method)
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss (per trained token)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def compare_methods(job: str | Path, methods: list[str], overrides: list[str], *, out_dir: str | Path | None = None,
                    address: str | None = None, status: Callable[[str], None] = lambda _: None,
                    progress=None) -> Comparison:
    """Train the job once per method, one after another, and tabulate and plot the results.

    A method that fails is reported in its row; the others still run."""
    from orchestrator.search.recipe import run_spec
    from orchestrator.tracking import runs
    from orchestrator.training import launch

    specs = method_specs(job, methods, overrides)
    first = next(iter(specs.values()))
    name = load_spec(job, overrides).name
    gpus = launch.connect(address)
    memory_kind = ("GPU: torch.cuda.max_memory_allocated of rank 0" if gpus and first.distributed.use_gpu
                   else "CPU: peak RSS of the rank-0 worker process (ru_maxrss), weights + activations + runtime")
    parent = runs.start_parent_run(first, name=f"{name}-compare", tags={"compare_methods": ",".join(methods)})
    status(f"MLflow parent run {parent.run_id} in experiment '{parent.experiment}'")
    results = []
    try:
        for method, spec in specs.items():
            status(f"[{method}] training")
            started = time.time()
            result = MethodResult(method=method)
            try:
                summary = run_spec(spec, address=address, register=False, parent_run_id=parent.run_id, force=True,
                                  status=lambda s, m=method: status(f"[{m}] {s}"),
                                  progress=(lambda label, i, n, m, meth=method: progress(f"{meth}: {label}", i, n, m))
                                  if progress else None)
            except Exception as e:  # one method's failure is a row of the table, not the end of it
                result.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                result.wall_s = time.time() - started
                status(f"[{method}] failed: {result.error}")
                results.append(result)
                continue
            result.run_id = summary.run_id
            result.trainable_params = summary.planned["trainable_params"]
            result.total_params = summary.planned["total_params"]
            result.planned_peak_bytes = summary.planned["peak_bytes"]
            result.measured_peak_bytes = summary.measured["peak_memory_bytes"]
            result.tokens_per_s = summary.metrics["tokens_per_s"]
            result.base_eval_loss = summary.metrics["base_eval_loss"]
            result.final_eval_loss = summary.metrics["eval_loss"]
            result.wall_s = summary.metrics["wall_s"]
            result.artifact_bytes = summary.measured["artifact_bytes"]
            result.eval_history = runs.run_metric_history(summary.tracking_uri, summary.run_id, "eval_loss")
            results.append(result)
        out = Path(out_dir or Path("compare") / f"{name}-{parent.run_id[:8]}")
        out.mkdir(parents=True, exist_ok=True)
        comparison = Comparison(parent_run_id=parent.run_id, experiment=parent.experiment, tracking_uri=parent.uri,
                                out_dir=str(out), memory_kind=memory_kind, results=results)
        (out / TABLE_FILE).write_text(csv_table(results), encoding="utf-8")
        (out / MARKDOWN_FILE).write_text(markdown_table(results), encoding="utf-8")
        (out / JSON_FILE).write_text(json.dumps(comparison.to_json(), indent=2), encoding="utf-8")
        plot_eval_loss(results, out / PLOT_FILE, f"{name}: eval loss by method")
        done = [r for r in results if not r.error]
        best = min(done, key=lambda r: r.final_eval_loss if r.final_eval_loss is not None and
                   math.isfinite(r.final_eval_loss) else math.inf, default=None)
        runs.log_files(parent, [out / f for f in (TABLE_FILE, MARKDOWN_FILE, JSON_FILE, PLOT_FILE)])
        runs.log_metrics(parent, {f"{r.method}.final_eval_loss": r.final_eval_loss for r in done})
        runs.set_tags(parent, {"best_method": best.method if best else "", "measured_peak_memory": memory_kind})
        runs.finish_run(parent, "FINISHED" if len(done) == len(results) else "FAILED")
    except BaseException:
        runs.finish_run(parent, "FAILED")
        raise
    return comparison
