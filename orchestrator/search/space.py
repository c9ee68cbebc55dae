"""Pure parts of a hyperparameter search: the `tune` section -> a Ray Tune search space, a
sampled config -> the trial's job spec, the checks that reject a space before anything runs,
the memory plans of the trials it can make, the ranking of trials, their table and their plots.

No Ray driver calls and no MLflow calls here (training/launch.py and the tracking package do those).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any

from orchestrator.spec import DomainSpec, JobSpec, Problem, SpecError, TuneSpec, parse_spec

# Trial states, as the trials table, the MLflow child runs and the summary name them.
COMPLETED, STOPPED, FAILED, RUNNING, PENDING = "completed", "stopped early", "failed", "running", "pending"
# The MLflow run status each final trial state is recorded with.
RUN_STATUS = {COMPLETED: "FINISHED", STOPPED: "KILLED", FAILED: "FAILED"}
# Checking a space tries every combination of its values (all choices, both ends of each
# range) up to this many; beyond it each searched value is checked on its own.
MAX_COMBINATIONS = 4096
# Planning the memory of a space plans every combination of those values up to this many;
# beyond it each value alone, then the combination of every field's most demanding value.
MAX_PLANNED_COMBINATIONS = 256


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _encoded(domain: DomainSpec) -> bool:
    """Optuna's categorical values must be scalars: a choice among lists travels as JSON text."""
    return domain.kind == "choice" and not all(_scalar(v) for v in domain.choice)


def param_space(tune: TuneSpec) -> dict[str, Any]:
    """The Ray Tune search space, keyed by the dotted spec path each value sets."""
    from ray import tune as rt

    space: dict[str, Any] = {}
    for path, d in tune.space.items():
        if d.kind == "choice":
            space[path] = rt.choice([json.dumps(v) for v in d.choice] if _encoded(d) else list(d.choice))
        elif d.kind == "uniform":
            space[path] = rt.uniform(*d.uniform)
        elif d.kind == "loguniform":
            space[path] = rt.loguniform(*d.loguniform)
        else:  # both ends included; Tune's randint excludes the upper one
            space[path] = rt.randint(d.randint[0], d.randint[1] + 1)
    return space


def trial_values(tune: TuneSpec, config: dict) -> dict[str, Any]:
    """A sampled Tune config -> {dotted path: spec value} (JSON-encoded choices decoded)."""
    out = {}
    for path, d in tune.space.items():
        value = config[path]
        out[path] = json.loads(value) if _encoded(d) and isinstance(value, str) else value
    return out


def _set(raw: dict, path: str, value: Any) -> bool:
    """Set `path` in the dumped spec `raw`; False when no such setting exists."""
    *parents, leaf = path.split(".")
    node = raw
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return False
    if not isinstance(node, dict) or leaf not in node or isinstance(node[leaf], dict):
        return False
    node[leaf] = value
    return True


def trial_spec(spec: JobSpec, values: dict[str, Any]) -> JobSpec:
    """The job one trial runs: the search's spec without `tune`, with `values` set and validated
    like a user's file. Raises `SpecError` (paths named `tune.space.<path>`)."""
    raw = spec.model_dump(mode="json")
    raw.pop("tune", None)
    for path, value in values.items():
        if not _set(raw, path, value):
            raise SpecError([_no_such_setting(path)])
    try:
        return parse_spec(raw)
    except SpecError as e:
        raise SpecError([_blame(p, values) for p in e.problems]) from None


def _blame(problem: Problem, values: dict) -> Problem:
    """A trial spec's problem as a problem of the space: the searched value it names (`peft.r=0:
    ...`), or else the combination of values that produced it (`with a=1, b=2: path: ...`)."""
    for path, value in values.items():
        if problem.path == path or problem.path.startswith(path + "."):
            others = ", ".join(f"{k}={v!r}" for k, v in values.items() if k != path)
            with_ = f" (with {others})" if others else ""
            return Problem(path=f"tune.space.{path}", message=f"{path}={value!r}{with_}: {problem.message}",
                           fix=problem.fix)
    shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
    where = f"tune.space.{next(iter(values))}" if values else "tune.space"
    for path in values:  # blame a value of the same section when one is searched
        if problem.path.split(".")[0] == path.split(".")[0]:
            where = f"tune.space.{path}"
    return Problem(path=where, message=f"with {shown}: {problem.path}: {problem.message}", fix=problem.fix)


def _no_such_setting(path: str) -> Problem:
    return Problem(path=f"tune.space.{path}", message=f"'{path}' is not a setting of the job",
                   fix="use the dotted path of a value, as `orchestrator validate JOB --show` lists them, "
                       "e.g. peft.r or training.learning_rate")


def _extremes(d: DomainSpec) -> list[Any]:
    """The values that stand for a domain when checking: every choice, or both ends of a range."""
    if d.kind == "choice":
        return list(d.choice)
    return list(getattr(d, d.kind))


def space_problems(spec: JobSpec, architecture=None) -> list[Problem]:
    """Everything wrong with `spec.tune.space` that would only show once a trial ran: paths that
    are not settings, values (alone or combined) that make an invalid job, and target-module
    presets that match nothing in `architecture` (a planning.architectures.Architecture, when known)."""
    tune = spec.tune
    problems: list[Problem] = []
    space = {p: d for p, d in tune.space.items() if d.kind is not None}
    raw = spec.model_dump(mode="json")
    for path in list(space):
        if not _set(json.loads(json.dumps(raw)), path, None):
            problems.append(_no_such_setting(path))
            del space[path]
    values = {p: _extremes(d) for p, d in space.items()}
    n = math.prod(len(v) for v in values.values())
    if n <= MAX_COMBINATIONS:
        candidates = [dict(zip(values, c)) for c in itertools.product(*values.values())]
    else:
        candidates = [{p: v} for p, vs in values.items() for v in vs]
    seen: set[str] = set()
    for values_ in candidates:
        try:
            trial = trial_spec(spec, values_)
        except SpecError as e:
            for p in e.problems:
                key = f"{p.path}|{p.message.split(': ', 1)[-1]}"
                if key not in seen:
                    seen.add(key)
                    problems.append(p)
            continue
        if architecture is not None and trial.peft.method == "lora":
            from orchestrator.planning.parameters import lora_targets

            try:
                lora_targets(architecture, trial.peft.target_modules)
            except SpecError as e:
                for p in e.problems:
                    key = f"targets|{p.message}"
                    if key not in seen:
                        seen.add(key)
                        where = "tune.space.peft.target_modules" if "peft.target_modules" in space else p.path
                        problems.append(Problem(path=where, message=f"{p.message} ({architecture.name})",
                                                fix=p.fix))
    return problems


# --- the trials' memory plans -----------------------------------------------------------------


def trials_to_plan(spec: JobSpec) -> list[dict[str, Any]]:
    """The searched values whose trial specs a search plans before it starts: every combination of
    the space's values (every choice, both ends of each range) when there are at most
    `MAX_PLANNED_COMBINATIONS`, else each value alone (the rest as the base has it); see
    `worst_values` for the combination added then."""
    values = {p: _extremes(d) for p, d in spec.tune.space.items() if d.kind is not None}
    if math.prod(len(v) for v in values.values()) <= MAX_PLANNED_COMBINATIONS:
        return [dict(zip(values, c)) for c in itertools.product(*values.values())]
    return [{p: v} for p, vs in values.items() for v in vs]


def worst_values(peaks: list[tuple[dict[str, Any], int]]) -> dict[str, Any]:
    """From the planned peaks of single values [({path: value}, bytes)], each path's most
    demanding value (the largest rank, the widest target-module preset, the largest micro batch,
    ... whichever the plans say needs the most): together, the worst trial of the space."""
    worst: dict[str, tuple[Any, int]] = {}
    for values, peak in peaks:
        for path, value in values.items():
            if path not in worst or peak > worst[path][1]:
                worst[path] = (value, peak)
    return {path: value for path, (value, _) in worst.items()}


@dataclass(frozen=True)
class TrialPlan:
    """One planned trial: its searched values and its memory plan (planning.memory.MemoryPlan)."""

    values: dict[str, Any]
    plan: Any

    @property
    def peak_bytes(self) -> int:
        return self.plan.total_bytes


def plan_trial(spec: JobSpec, values: dict[str, Any], gpu_memory_bytes: int, source: str) -> TrialPlan:
    """The memory plan of the trial with `values`, against `gpu_memory_bytes` per GPU (from `source`)."""
    from orchestrator.planning.budget import plan_for_run

    trial = trial_spec(spec, values)
    return TrialPlan(values, plan_for_run(trial, trial.distributed.num_workers, gpu_memory_bytes, source=source))


def plan_trials(spec: JobSpec, gpu_memory_bytes: int, source: str) -> list[TrialPlan]:
    """The plans of the trials `trials_to_plan` names, and, when those are single values, of the
    combination of every field's most demanding one (skipped when those values together make an
    invalid job, which no trial can then be)."""
    planned = trials_to_plan(spec)
    plans = [plan_trial(spec, values, gpu_memory_bytes, source) for values in planned]
    if any(len(values) < len(spec.tune.space) for values in planned):  # single values: add the worst together
        worst = worst_values([(p.values, p.peak_bytes) for p in plans])
        try:
            plans.append(plan_trial(spec, worst, gpu_memory_bytes, source))
        except SpecError:
            pass
    return plans


def _cli_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _shown(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in values.items())


def misfit_problems(plans: list[TrialPlan]) -> list[Problem]:
    """One problem per searched value whose planned trials all need more GPU memory than they
    would get (`tune.space.<path>: <path>=<value>: ...`), and one per other trial that does not
    fit (a combination); empty when every planned trial fits."""
    from orchestrator.planning.units import human

    misfits = [p for p in plans if not p.plan.fits]
    if not misfits:
        return []
    budget = f"{human(misfits[0].plan.gpu_memory_bytes)} per GPU ({misfits[0].plan.gpu_memory_source})"
    force = "or pass --force to run it anyway"
    if len(misfits) == len(plans):
        least = min(plans, key=lambda p: p.peak_bytes)
        return [Problem(path="tune.space", message=f"no planned trial fits {budget}: the smallest "
                                                   f"({_shown(least.values)}) needs {human(least.peak_bytes)}",
                        fix=f"make the base job fit first (`orchestrator plan` lists the changes that do), {force}")]
    def key(value: Any) -> str:  # values may be lists (target modules)
        return json.dumps(value, sort_keys=True)

    problems, explained = [], set()
    paths = list(dict.fromkeys(path for p in plans for path in p.values))
    for path in paths:
        for value in dict.fromkeys(key(p.values[path]) for p in plans if path in p.values):
            with_value = [p for p in plans if path in p.values and key(p.values[path]) == value]
            if all(not p.plan.fits for p in with_value):
                worst = max(with_value, key=lambda p: p.peak_bytes)
                explained.update(id(p) for p in with_value)
                problems.append(Problem(
                    path=f"tune.space.{path}",
                    message=f"{path}={json.loads(value)!r}: no planned trial with it fits {budget}; "
                            f"the largest ({_shown(worst.values)}) needs {human(worst.peak_bytes)}",
                    fix=f"drop {json.loads(value)!r} from tune.space.{path}, {force}"))
    for p in misfits:
        if id(p) not in explained:
            problems.append(Problem(
                path=f"tune.space.{next(iter(p.values))}",
                message=f"with {_shown(p.values)}: the trial needs {human(p.peak_bytes)}, more than {budget}",
                fix=f"narrow the space so these values do not meet (`orchestrator plan JOB "
                    f"{' '.join(f'--set {k}={_cli_value(v)}' for k, v in p.values.items())}` lists the "
                    f"changes that fit), {force}"))
    return problems


def resolved_targets(spec: JobSpec, architecture) -> list[str]:
    """The module names a trial's `peft.target_modules` resolves to on this architecture."""
    from orchestrator.planning.parameters import lora_targets

    return list(lora_targets(architecture, spec.peft.target_modules))


def evaluations(spec: JobSpec, total_steps: int) -> int:
    """Reports a trial sends Tune: one per evaluation (every `eval_every` steps, and the last)."""
    every = spec.training.eval_every
    return total_steps // every + (1 if total_steps % every else 0)


# --- trials: their state, ranking, table and plots ------------------------------------------


@dataclass
class TrialRecord:
    """One trial as the driver saw it."""

    trial_id: str
    values: dict[str, Any]
    state: str = PENDING
    metrics: dict = field(default_factory=dict)  # the latest report (rank 0's metrics)
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, metric) per report
    run_id: str | None = None
    adapter_dir: str | None = None
    error: str | None = None
    planned_peak_bytes: int | None = None  # per GPU, from the trial's memory plan

    def to_json(self, metric: str) -> dict:
        return {"trial_id": self.trial_id, "state": self.state, "params": self.values,
                "planned_peak_bytes": self.planned_peak_bytes, "metric": self.metrics.get(metric),
                "step": self.metrics.get("step"), "run_id": self.run_id}


def final_state(last_step: int | None, total_steps: int, errored: bool) -> str:
    """How a trial ended: errored -> failed; its last report at the final step -> completed;
    else the scheduler stopped it early."""
    if errored:
        return FAILED
    return COMPLETED if last_step == total_steps else STOPPED


def ranked(trials: list[TrialRecord], metric: str, mode: str) -> list[TrialRecord]:
    """Completed trials first, best first by `metric`; then the others (stopped, failed) by metric."""
    sign = 1.0 if mode == "min" else -1.0

    def key(t: TrialRecord):
        value = t.metrics.get(metric)
        ok = isinstance(value, (int, float)) and math.isfinite(value)
        return (t.state != COMPLETED, not ok, sign * value if ok else 0.0, t.trial_id)

    return sorted(trials, key=key)


def best_trial(trials: list[TrialRecord], metric: str, mode: str) -> TrialRecord | None:
    """The best completed trial with a finite metric (None when no trial completed)."""
    for t in ranked(trials, metric, mode):
        value = t.metrics.get(metric)
        if t.state == COMPLETED and isinstance(value, (int, float)) and math.isfinite(value):
            return t
    return None


def trials_csv(trials: list[TrialRecord], metric: str, mode: str) -> str:
    """The ranked trials as CSV: rank, trial, state, each searched value, planned peak GPU
    memory (bytes), metric, last step, run."""
    paths = sorted({p for t in trials for p in t.values})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["rank", "trial_id", "state", *paths, "planned_peak_bytes", metric, "step", "run_id"])
    for i, t in enumerate(ranked(trials, metric, mode), 1):
        writer.writerow([i, t.trial_id, t.state, *(json.dumps(t.values.get(p)) if not _scalar(t.values.get(p))
                                                   else t.values.get(p) for p in paths),
                         t.planned_peak_bytes if t.planned_peak_bytes is not None else "",
                         t.metrics.get(metric), t.metrics.get("step"), t.run_id or ""])
    return out.getvalue()


def curves_figure(trials: list[TrialRecord], metric: str):
    """`metric` against step, one line per trial (a stopped trial's line ends early)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for t in trials:
        if t.history:
            steps, values = zip(*t.history)
            ax.plot(steps, values, marker="o", label=f"{t.trial_id} ({t.state})")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial")
    if any(t.history for t in trials):
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def parameter_figure(trials: list[TrialRecord], metric: str, path: str):
    """The final `metric` of each trial against the value it had for `path` (numbers on a
    numeric axis, anything else as categories); filled markers for completed trials."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    points = [(t.values.get(path), t.metrics.get(metric), t.state) for t in trials
              if isinstance(t.metrics.get(metric), (int, float))]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v, _, _ in points)
    labels = sorted({json.dumps(v) if not _scalar(v) else str(v) for v, _, _ in points})
    for value, y, state in points:
        x = value if numeric else labels.index(json.dumps(value) if not _scalar(value) else str(value))
        ax.scatter([x], [y], facecolors="C0" if state == COMPLETED else "none", edgecolors="C0")
    if not numeric:
        ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    elif points and min(v for v, _, _ in points) > 0 and max(v for v, _, _ in points) / min(
            v for v, _, _ in points) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(path)
    ax.set_ylabel(f"final {metric}")
    fig.tight_layout()
    return fig


def plot_name(path: str) -> str:
    """The artifact path of the plot of the final metric against `path`."""
    return "plots/metric_vs_" + "".join(c if c.isalnum() or c in "._-" else "_" for c in path) + ".png"
