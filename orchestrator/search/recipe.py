"""`orchestrator run` of a job with a `tune` section: a hyperparameter search.

search spec -> checks (every value of the space makes a valid job) -> prepare (base, data, Ray)
-> the trials' memory plans (a GPU search whose trials cannot fit is refused) -> parent MLflow
run -> Ray Tune: each trial fits its own TorchTrainer and logs into a nested child run (with its
own plan's peak); ASHA stops the trials that trail -> trials table and plots on the parent -> the
best completed trial's adapter registered -> summary. An interrupted search resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

from orchestrator.search import space
from orchestrator.spec import JobSpec, SpecError
from orchestrator.storage import local_copy, storage_location
from orchestrator.training.checkpoint import ADAPTER_DIR

SEARCH_TAG = "search"  # "parent" on the search's run, "trial" on each trial's run
TRIAL_TAG = "tune_trial_id"
SEARCH_RUN_TAG = "search_run_id"
INTERRUPTED_TAG = "interrupted"  # a trial's run whose driver stopped; the trial re-ran in a new run
PLANNED_PEAK_TAG = "planned_peak_bytes"  # a trial's planned GPU memory per GPU (its own memory plan)


@dataclass
class TrialContext:
    """What every trial gets from the driver (through Ray's object store)."""

    spec: dict  # the search's spec, `tune` included
    data: object  # data.pipeline.TokenizedData: where the tokenized rows are, and their counts
    gpus: float
    tracking_uri: str
    parent_run_id: str
    lineage: dict
    trainers_path: str  # Ray Train's storage for the trials' TorchTrainers
    gpu_memory_bytes: int  # what each trial's memory plan is made against, and where that came from
    gpu_memory_source: str


def trial_setup(spec: JobSpec, values: dict, num_train: int, gpus: float):
    """(trial spec, its Ray resources, its optimizer steps) for the searched `values`."""
    from orchestrator.planning.resources import resources
    from orchestrator.planning.steps import optimizer_steps

    tspec = space.trial_spec(spec, values)
    res = resources(tspec, gpus_available=gpus)
    return tspec, res, optimizer_steps(tspec, num_train, res.num_workers)


def run_trial(config: dict, ctx: TrialContext) -> None:
    """One trial (a Ray Tune function): the job with the sampled values, trained by its own
    TorchTrainer, logged into a child run of the search's run. Rank 0's reports reach Tune."""
    from orchestrator.planning.deepspeed import deepspeed_config
    from orchestrator.tracking import runs
    from orchestrator.training import launch
    from orchestrator.training.worker import WorkerJob

    spec = JobSpec.model_validate(ctx.spec)
    values = space.trial_values(spec.tune, config)
    tspec, res, total = trial_setup(spec, values, ctx.data.train_examples, ctx.gpus)
    memory = space.plan_trial(spec, values, ctx.gpu_memory_bytes, ctx.gpu_memory_source).plan
    ds_config = deepspeed_config(tspec, world_size=res.num_workers, use_gpu=res.use_gpu, total_steps=total,
                                 trainable_params=memory.params.trainable, largest_param=memory.params.largest,
                                 hidden_size=memory.architecture.hidden_size)
    trial_id = launch.trial_id()
    handle = runs.start_run(
        tspec, run_name=f"{spec.name}-{trial_id}", parent_run_id=ctx.parent_run_id,
        tags={SEARCH_TAG: "trial", TRIAL_TAG: trial_id, SEARCH_RUN_TAG: ctx.parent_run_id,
              "searched": json.dumps(values), "total_steps": str(total), "num_workers": str(res.num_workers),
              "use_gpu": str(res.use_gpu), PLANNED_PEAK_TAG: str(memory.total_bytes),
              **runs.lineage_tags(ctx.lineage)},
        artifacts={"deepspeed_config.json": ds_config, "memory_plan.json": memory.to_json()})
    runs.log_metrics(handle, {"planned_gpu_bytes": memory.total_bytes}, step=0)  # as a single run logs it
    job = WorkerJob(spec=tspec.model_dump(mode="json"), deepspeed_config=ds_config, total_steps=total,
                    data=ctx.data, train_examples=ctx.data.train_examples, eval_examples=ctx.data.stats["eval_examples"],
                    pad_id=ctx.data.pad_id, use_gpu=res.use_gpu,
                    tracking_uri=handle.uri, run_id=handle.run_id, report_evals=True)
    launch.fit(job, name=trial_id, resources=res, storage_path=ctx.trainers_path,
               max_failures=tspec.distributed.max_failures, in_tune=True)
    # Trained to its end. Any other ending (an error, stopped by the scheduler or the time
    # budget) is written by the driver, which hears it from Tune: a trial Tune stops can still
    # be raising here as its Train run is torn down, and must not mark itself failed.
    runs.finish_run(handle, "FINISHED")


def check_space(spec: JobSpec) -> None:
    """Raise `SpecError` when some value of the search space makes an invalid job (target-module
    presets resolved against the base's architecture, when it can be read)."""
    from orchestrator.planning.architectures import architecture_for

    try:
        architecture = architecture_for(spec)
    except SpecError:  # an architecture the planner does not know: the trials resolve presets
        architecture = None
    problems = space.space_problems(spec, architecture)
    if problems:
        raise SpecError(problems)


def check_trials_fit(spec: JobSpec, memory, use_gpu: bool, force: bool,
                     status: Callable[[str], None]) -> list[space.TrialPlan]:
    """Plan every trial the space can make (`space.plan_trials`) against the GPU the base job was
    planned against (`memory`, its plan); a GPU search with trials that cannot fit raises
    `SpecError` naming the searched values, unless `force`. On CPUs nothing is checked (each
    trial's run still logs its own plan), and no plans are returned."""
    from orchestrator.planning.units import human

    if not use_gpu:  # up to 256+ plans, ~20 ms each, that nothing would read
        return []
    plans = space.plan_trials(spec, memory.gpu_memory_bytes, memory.gpu_memory_source)
    if plans:
        worst = max(plans, key=lambda p: p.peak_bytes)
        status(f"Memory plan: {len(plans)} trial(s) of the space need up to {human(worst.peak_bytes)} of "
               f"{human(memory.gpu_memory_bytes)} per GPU ({memory.gpu_memory_source})")
        problems = space.misfit_problems(plans)
        if problems and not force:
            raise SpecError(problems)
    return plans


def concurrency(spec: JobSpec, res, capacity: dict[str, float], fixed_cluster: bool) -> int:
    """Trials at once: `tune.max_concurrent_trials`, or as many as the cluster holds now. On a
    cluster that cannot grow (a local Ray) more than it holds is refused: the extra trials would
    wait for workers that never come."""
    from orchestrator.spec import Problem

    kind = "GPU" if res.use_gpu else "CPU"
    per_trial = res.num_workers * (1 if res.use_gpu else res.cpus_per_worker)
    fits = int(capacity[kind] // per_trial)
    wanted = spec.tune.max_concurrent_trials
    if fits < 1 or (fixed_cluster and wanted is not None and wanted > fits):
        raise SpecError([Problem(
            path="tune.max_concurrent_trials",
            message=f"{wanted or 1} trial(s) at once need {(wanted or 1) * per_trial:g} {kind}s "
                    f"({res.num_workers} worker(s) x {per_trial // res.num_workers} each), "
                    f"and this Ray instance has {capacity[kind]:g}",
            fix=f"set tune.max_concurrent_trials={max(fits, 1)}" + (
                "" if fits else " and lower distributed.num_workers or distributed.cpus_per_worker"))])
    return min(wanted or fits, spec.tune.num_samples)


def _setup(spec: JobSpec, total_steps: int, max_concurrent: int):
    from orchestrator.training.launch import SearchSetup

    t = spec.tune
    return SearchSetup(metric=t.metric, mode=t.mode, num_samples=t.num_samples,
                       max_concurrent_trials=max_concurrent, scheduler=t.scheduler.type,
                       grace_period=t.scheduler.grace_period, reduction_factor=t.scheduler.reduction_factor,
                       max_evaluations=space.evaluations(spec, total_steps), search_alg=t.search_alg,
                       seed=t.seed, time_budget_s=t.time_budget_s)


def _parent_run(spec: JobSpec, restart: bool, status, artifacts: dict, tags: dict):
    """The search's MLflow run: the unfinished one of this same spec (resume), else a new one."""
    from orchestrator.tracking import runs

    uri = runs.resolve_tracking_uri(spec.tracking.uri)
    if not restart:
        for handle, state, _ in runs.find_runs(uri, spec.experiment,
                                                   {SEARCH_TAG: "parent", "spec_hash": spec.spec_hash()}):
            if state != "FINISHED":
                status(f"Resuming the search of MLflow run {handle.run_id} (--restart starts afresh)")
                runs.reopen_run(handle)
                # Trials whose driver stopped re-run from their start, in new child runs.
                for child, child_state, _ in runs.find_runs(uri, spec.experiment,
                                                                {SEARCH_RUN_TAG: handle.run_id}):
                    if child_state == "RUNNING":
                        runs.set_tags(child, {INTERRUPTED_TAG: "true"})
                        runs.finish_run(child, "FAILED")
                return handle
            break  # the latest search of this spec finished: a new one
    return runs.start_run(spec, run_name=f"{spec.name}-search", tags=tags, artifacts=artifacts)


def run_search(spec: JobSpec, *, address: str | None = None, verbose: bool = False, force: bool = False,
               gpu_memory_bytes: int | None = None, restart: bool = False,
               status: Callable[[str], None] = lambda _: None, progress=None,
               on_trials: Callable[[list], None] | None = None):
    """Run (or resume) the search `spec.tune` describes; returns the run summary of the best
    trial, with the search's run id and every trial. Raises `SpecError` for a space that can
    make an invalid job, before anything runs."""
    from orchestrator.tracking import registry, runs
    from orchestrator.training import launch
    from orchestrator.training.recipe import RunSummary, fetch_progress, lineage_of, prepare

    started = time.time()
    check_space(spec)
    p = prepare(spec, address=address, verbose=verbose, force=force, gpu_memory_bytes=gpu_memory_bytes,
                status=status, progress=progress)
    tune = spec.tune
    check_trials_fit(spec, p.memory, p.resources.use_gpu, force, status)
    at_once = concurrency(spec, p.resources, launch.cluster_capacity(), fixed_cluster=address is None)
    n_train = p.data.train_examples
    _, _, base_total = trial_setup(spec, {}, n_train, p.gpus)
    lineage = lineage_of(spec, p.base_path, p.data.files_sha256)
    parent = _parent_run(spec, restart, status, tags={
        SEARCH_TAG: "parent", "search_name": spec.name, **runs.lineage_tags(lineage)}, artifacts={
        "search_space.json": {path: d.model_dump(exclude_none=True) for path, d in tune.space.items()},
        "data_stats.json": p.data.stats})
    status(f"MLflow run {parent.run_id} (the search) in experiment '{parent.experiment}'")
    name = f"{spec.name}-search-{parent.run_id[:8]}"
    # Trials run in Tune's trial directories: a relative sqlite URI would give each its own store.
    trials_spec = spec.model_copy(deep=True)
    trials_spec.tracking.uri = parent.uri
    ctx = TrialContext(spec=trials_spec.model_dump(mode="json"), data=p.data, gpus=p.gpus, tracking_uri=parent.uri,
                       parent_run_id=parent.run_id, lineage=lineage,
                       trainers_path=storage_location(launch.search_dir(spec.storage.path, name), "trainers"),
                       gpu_memory_bytes=p.memory.gpu_memory_bytes, gpu_memory_source=p.memory.gpu_memory_source)
    records: dict[str, space.TrialRecord] = {}
    totals: dict[str, int] = {}
    plans: dict[str, object] = {}  # trial id -> its memory plan (the one its run logs)

    def record(trial_id: str, config: dict) -> space.TrialRecord:
        if trial_id not in records:
            values = space.trial_values(tune, config)
            plans[trial_id] = space.plan_trial(spec, values, p.memory.gpu_memory_bytes,
                                               p.memory.gpu_memory_source).plan
            records[trial_id] = space.TrialRecord(trial_id=trial_id, values=values,
                                                  planned_peak_bytes=plans[trial_id].total_bytes)
            totals[trial_id] = trial_setup(spec, values, n_train, p.gpus)[2]
        return records[trial_id]

    def finish(rec: space.TrialRecord, errored: bool) -> None:
        rec.state = space.final_state(rec.metrics.get("step"), totals[rec.trial_id], errored)
        child = _trial_run(parent, rec.trial_id)
        if child is not None:
            rec.run_id = child.run_id
            runs.finish_run(child, space.RUN_STATUS[rec.state])

    def on_event(event: str, trial_id: str, config: dict, result: dict) -> None:
        rec = record(trial_id, config)
        if event in ("start", "result"):
            rec.state = space.RUNNING
        if event == "result":
            rec.metrics = result
            if isinstance(result.get(tune.metric), (int, float)):
                rec.history.append((int(result.get("step", 0)), float(result[tune.metric])))
        if event in ("complete", "error"):
            if result:
                rec.metrics = result
            finish(rec, errored=event == "error")
        if on_trials:
            on_trials(space.ranked(list(records.values()), tune.metric, tune.mode))

    status(f"Searching {tune.num_samples} trial(s) of {base_total} steps, "
           f"{at_once} at a time"
           + (f", ASHA after {tune.scheduler.grace_period} evaluation(s)" if tune.scheduler.type == "asha" else ""))
    try:
        results = launch.tune(run_trial, {"ctx": ctx}, param_space=space.param_space(tune),
                              setup=_setup(spec, base_total, at_once), name=name, storage_path=spec.storage.path,
                              on_event=on_event)
        if any(t.state == space.RUNNING for t in records.values()):
            # Tune returns early, with trials still running, when the driver is interrupted (Ctrl-C).
            raise KeyboardInterrupt(f"search interrupted; resume it with `orchestrator resume {spec.name}`")
        for r in results:  # trials that finished before a resume sent no events this time
            if not r["trial_id"] or not set(tune.space) <= set(r["config"]):
                continue  # never started
            if r["trial_id"] not in records or records[r["trial_id"]].state in (space.PENDING, space.RUNNING):
                rec = record(r["trial_id"], r["config"])
                rec.metrics = r["last_result"]
                finish(rec, errored=r["error"] is not None)
        trials = list(records.values())
        for rec in trials:  # the curves as the child runs hold them (also for resumed trials)
            if rec.run_id:
                rec.history = runs.run_metric_history(parent.uri, rec.run_id, tune.metric)
        best = space.best_trial(trials, tune.metric, tune.mode)
        table = space.trials_csv(trials, tune.metric, tune.mode)
        artifacts = {"trials.csv": table, "plots/curves.png": space.curves_figure(trials, tune.metric)}
        artifacts.update({space.plot_name(path): space.parameter_figure(trials, tune.metric, path)
                          for path in tune.space})
        runs.log_artifacts(parent, artifacts)
        counts = {state: sum(t.state == state for t in trials) for state in space.RUN_STATUS}
        runs.log_metrics(parent, {f"trials_{s.replace(' ', '_')}": n for s, n in counts.items()})
        if best is None:
            raise RuntimeError(f"no trial of the search completed ({counts}); see the trials in MLflow run "
                               f"{parent.run_id}")
        tspec = space.trial_spec(trials_spec, best.values)
        child = runs.run_handle(parent.uri, best.run_id)
        # The trial's final checkpoint, where its TorchTrainer keeps it (a local path, or a URI:
        # the adapter alone is fetched from the bucket, and removed once registered).
        saved = launch.latest_checkpoint(ctx.trainers_path, best.trial_id)
        if saved is None:
            raise RuntimeError(f"the best trial {best.trial_id} completed without a checkpoint under "
                               f"{ctx.trainers_path}")
        status(f"Registering the best trial's adapter ({best.trial_id}) as '{tspec.registered_name}'")
        with local_copy(storage_location(saved[1], ADAPTER_DIR), fetch_progress(progress)) as adapter_dir:
            version = registry.register_trained(child, tspec, adapter_dir, lineage=lineage, tags={
                "spec_hash": tspec.spec_hash(), "base_model": spec.model.base, TRIAL_TAG: best.trial_id,
                SEARCH_RUN_TAG: parent.run_id})
        wall = time.time() - started
        best_plan = plans[best.trial_id]
        m = best.metrics
        metrics = {"base_eval_loss": m.get("base_eval_loss"), "eval_loss": m.get("eval_loss"),
                   "train_loss": m.get("train_loss"), "tokens_per_s": m.get("tokens_per_s"), "wall_s": round(wall, 1)}
        runs.log_params(parent, {f"best.{k}": v for k, v in best.values.items()})
        runs.log_metrics(parent, {f"best_{k}": v for k, v in metrics.items() if k != "wall_s"} | {"wall_s": wall})
        runs.set_tags(parent, {"best_trial": best.trial_id, "best_run_id": best.run_id,
                                   "registered_model": version.uri, "registered_version": version.version})
        runs.finish_run(parent, "FINISHED")
    except KeyboardInterrupt:
        runs.finish_run(parent, "KILLED")
        raise
    except BaseException:
        runs.finish_run(parent, "FAILED")
        raise
    metrics = {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in metrics.items()}
    return RunSummary(run_id=parent.run_id, experiment=parent.experiment, tracking_uri=parent.uri,
                      metrics=metrics, data=p.data.stats, registered_model={**asdict(version), "uri": version.uri},
                      planned={"total_params": best_plan.params.total, "trainable_params": best_plan.params.trainable,
                               "peak_bytes": best_plan.total_bytes, "world_size": best_plan.world_size},
                      trials=[t.to_json(tune.metric) for t in space.ranked(trials, tune.metric, tune.mode)])


# What `run_spec` passes on to a search: the options of `run_job` a search has too.
_SEARCH_OPTIONS = ("address", "verbose", "force", "gpu_memory_bytes", "restart", "status", "progress")


def run_spec(spec: JobSpec, *, on_trials: Callable[[list], None] | None = None, **kwargs):
    """Run a job: a search (`run_search`) when it has a `tune` section, else one training run
    (`training.recipe.run_job`, which takes `kwargs`). The dispatch lives here, above both, so that
    training never imports search; `restart` starts a search afresh instead of resuming an
    unfinished one, `on_trials` sees the trials as they change."""
    from orchestrator.training.recipe import run_job

    if spec.tune is not None:
        return run_search(spec, on_trials=on_trials, **{k: v for k, v in kwargs.items() if k in _SEARCH_OPTIONS})
    return run_job(spec, **kwargs)


def _trial_run(parent, trial_id: str):
    """The newest child run of `parent` for `trial_id` (None before the trial started one)."""
    from orchestrator.tracking import runs

    found = runs.find_runs(parent.uri, parent.experiment, {SEARCH_RUN_TAG: parent.run_id, TRIAL_TAG: trial_id})
    return found[0][0] if found else None


def resume(name: str, tracking_uri: str, **kwargs):
    """Resume the latest unfinished search of the job `name` from the spec its run saved."""
    from orchestrator.spec import SPEC_FILE, Problem, parse_spec
    from orchestrator.tracking import runs

    uri = runs.resolve_tracking_uri(tracking_uri)
    found = [r for r in runs.find_runs_anywhere(uri, {SEARCH_TAG: "parent", "search_name": name})
             if r[1] != "FINISHED"]
    if not found:
        raise SpecError([Problem(path="NAME", message=f"no unfinished search of a job named '{name}' in {uri}",
                                 fix="pass the job's name and the --tracking-uri its search used, or "
                                     "`orchestrator run JOB.yaml` to start one")])
    import yaml

    spec = parse_spec(yaml.safe_load(runs.read_run_text(found[0][0], SPEC_FILE)), source=f"run {found[0][0].run_id}")
    return run_search(spec, **kwargs)
