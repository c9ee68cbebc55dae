"""The search space of a `tune:` section: which spaces are accepted, which are refused before
anything runs (and with which line), and the pure bookkeeping of trials (ranking, table)."""

from __future__ import annotations

import pytest

from orchestrator.planning.architectures import architecture_for
from orchestrator.search import space as search
from orchestrator.spec import SpecError, load_spec

from conftest import REPO


def tuned(space: str, *sets: str):
    return load_spec(REPO / "jobs" / "quickstart.yaml", [f"tune={{space: {space}}}", *sets])


def problems_of(space: str, *sets: str) -> list[str]:
    try:
        spec = tuned(space, *sets)
    except SpecError as e:
        return [str(p) for p in e.problems]
    return [str(p) for p in search.space_problems(spec, architecture_for(spec))]


GOOD = [
    "{peft.r: {choice: [4, 8, 16, 32]}, peft.alpha: {choice: [8, 16, 32, 64]}}",
    "{peft.target_modules: {choice: [attention, mlp, all-linear, [q_proj, v_proj]]}}",
    "{training.learning_rate: {loguniform: [1.0e-4, 5.0e-3]}, training.warmup_ratio: {uniform: [0.0, 0.2]}}",
    "{peft.r: {randint: [2, 16]}, peft.method: {choice: [lora]}}",
    "{distributed.deepspeed.stage: {choice: [0, 2, 3]}, training.micro_batch_size: {choice: [4, 8]}}",
]


@pytest.mark.parametrize("space", GOOD)
def test_good_spaces_pass_and_every_sample_is_a_valid_job(space):
    assert problems_of(space) == []
    spec = tuned(space)
    config = {path: d.sample() for path, d in search.param_space(spec.tune).items()}
    trial = search.trial_spec(spec, search.trial_values(spec.tune, config))
    assert trial.tune is None
    for path, value in search.trial_values(spec.tune, config).items():
        section, *rest = path.split(".")
        node = getattr(trial, section)
        for part in rest:
            node = getattr(node, part)
        assert node == value


BAD = [
    # (space, extra --set, the start of the one expected line)
    ("{peft.rank: {choice: [4, 8]}}", (), "tune.space.peft.rank: 'peft.rank' is not a setting of the job"),
    ("{peft: {choice: [4]}}", (), "tune.space.peft: 'peft' is not a setting of the job"),
    ("{peft.r: {choice: [0, 8]}}", (), "tune.space.peft.r: peft.r=0: Input should be greater than or equal to 1"),
    ("{training.learning_rate: {uniform: [0.5, 2.0]}}", (),
     "tune.space.training.learning_rate: training.learning_rate=2.0: Input should be less than or equal to 1"),
    ("{peft.target_modules: {choice: [attn, mlp]}}", (), "tune.space.peft.target_modules: peft.target_modules='attn': "
                                                        "unknown preset 'attn'"),
    ("{peft.target_modules: {choice: [[q_proj, query]]}}", (),
     "tune.space.peft.target_modules: the model has no linear module named query (builtin:tiny-llama)"),
    # A combination: offload_params needs stage 3, which only some samples have.
    ("{distributed.deepspeed.stage: {choice: [2, 3]}, distributed.deepspeed.offload_params: {choice: [true]}}", (),
     "tune.space.distributed.deepspeed.offload_params: distributed.deepspeed.offload_params=True "
     "(with distributed.deepspeed.stage=2): parameter offload needs ZeRO stage 3"),
    ("{peft.method: {choice: [lora, full]}}", (), "tune.space.peft.method: with peft.method='full': "
                                                  "quantization.bits: full fine-tuning trains the base's own weights, which cannot be trained "
                                                  "4-bit quantized"),
    ("{peft.r: {uniform: [8, 4]}}", (), "tune.space.peft.r: uniform range [8.0, 4.0] is empty"),
    ("{training.learning_rate: {loguniform: [0.0, 0.1]}}", (),
     "tune.space.training.learning_rate: loguniform needs a positive low end"),
    ("{peft.r: {choice: [4], uniform: [1, 2]}}", (), "tune.space.peft.r: give exactly one of choice"),
    ("{peft.r: {chioce: [4]}}", (), "tune.space.peft.r.chioce: unknown key. Fix: did you mean 'choice'?"),
    ("{tune.num_samples: {choice: [1, 2]}}", (), "tune.space.tune.num_samples: 'tune.num_samples' cannot be searched"),
    ("{}", (), "tune.space: nothing to search"),
    ("{peft.r: {choice: [4]}}", ("training.checkpoint_every=30",),
     "training.checkpoint_every: 30 is not a multiple of training.eval_every (50) in a search"),
    ("{peft.r: {choice: [4]}}", ("tune.metric=accuracy",), "tune.metric: 'accuracy' is not reported by the trials"),
]


@pytest.mark.parametrize("space,sets,expected", BAD, ids=[b[2].split(":")[0] + f"-{i}" for i, b in enumerate(BAD)])
def test_bad_spaces_are_refused_naming_the_path_and_the_fix(space, sets, expected):
    problems = problems_of(space, *sets)
    assert any(p.startswith(expected) for p in problems), problems
    assert all(" Fix: " in p for p in problems), problems


def test_cli_validate_refuses_a_bad_space_with_exit_2(tmp_path):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    result = CliRunner().invoke(app, ["validate", str(REPO / "jobs" / "quickstart.yaml"),
                                      "--set", "tune={space: {peft.r: {choice: [0, 8]}}}"])
    assert result.exit_code == 2
    assert "tune.space.peft.r: peft.r=0" in result.output
    ok = CliRunner().invoke(app, ["validate", str(REPO / "jobs" / "tune-quickstart.yaml")])
    assert ok.exit_code == 0, ok.output


# --- the trials' memory plans: which trials are planned, and which searched values cannot fit ---

BIG_SPACE = ("{peft.r: {choice: [2, 4, 8, 64]}, training.micro_batch_size: {choice: [1, 2, 4, 16]}, "
             "peft.target_modules: {choice: [attention, mlp, all-linear]}, peft.alpha: {choice: [8, 16, 32]}, "
             "training.learning_rate: {loguniform: [1.0e-4, 1.0e-2]}}")  # 4 x 4 x 3 x 3 x 2 = 288 > 256


@pytest.mark.parametrize("space,planned", [
    ("{peft.r: {choice: [4, 64]}}", [{"peft.r": 4}, {"peft.r": 64}]),
    ("{peft.r: {randint: [2, 16]}, training.learning_rate: {uniform: [1.0e-4, 1.0e-3]}}",
     [{"peft.r": 2, "training.learning_rate": 1e-4}, {"peft.r": 2, "training.learning_rate": 1e-3},
      {"peft.r": 16, "training.learning_rate": 1e-4}, {"peft.r": 16, "training.learning_rate": 1e-3}]),
    # Beyond 256 combinations: each value alone (4 + 4 + 3 + 3 + 2 = 16 specs, not 288).
    (BIG_SPACE, 16),
])
def test_trials_to_plan_are_every_combination_of_a_small_space_else_each_value_alone(space, planned):
    got = search.trials_to_plan(tuned(space))
    if isinstance(planned, int):
        assert len(got) == planned and all(len(values) == 1 for values in got)
    else:
        assert got == planned


def test_a_large_space_is_planned_at_each_fields_most_demanding_value_together():
    plans = search.plan_trials(tuned(BIG_SPACE), 80 * 2**30, "given")
    assert len(plans) == 17
    worst = plans[-1]  # the combination added after the single values
    assert {k: worst.values[k] for k in ("peft.r", "training.micro_batch_size", "peft.target_modules")} == {
        "peft.r": 64, "training.micro_batch_size": 16, "peft.target_modules": "all-linear"}
    assert worst.peak_bytes == max(p.peak_bytes for p in plans)
    assert all(p.plan.gpu_memory_source == "given" for p in plans)


SMALL_SPACE = "{peft.r: {choice: [4, 64]}, training.micro_batch_size: {choice: [1, 16]}}"


def test_searched_values_whose_trials_cannot_fit_are_named_with_the_fix():
    spec = tuned(SMALL_SPACE)
    at_80 = search.plan_trials(spec, 80 * 2**30, "given")
    assert search.misfit_problems(at_80) == []
    by = {(p.values["peft.r"], p.values["training.micro_batch_size"]): p for p in at_80}
    # Micro batch 16 needs more than micro batch 1 whatever the rank: a GPU between the two refuses it.
    assert max(by[4, 1].peak_bytes, by[64, 1].peak_bytes) < min(by[4, 16].peak_bytes, by[64, 16].peak_bytes)
    budget = (max(by[4, 1].peak_bytes, by[64, 1].peak_bytes) + min(by[4, 16].peak_bytes, by[64, 16].peak_bytes)) // 2
    problems = [str(p) for p in search.misfit_problems(search.plan_trials(spec, budget, "the test's GPU"))]
    assert len(problems) == 1, problems
    assert problems[0].startswith("tune.space.training.micro_batch_size: training.micro_batch_size=16: no planned "
                                  "trial with it fits"), problems
    assert "(the test's GPU)" in problems[0]
    assert "Fix: drop 16 from tune.space.training.micro_batch_size, or pass --force" in problems[0]
    # Only the largest pair does not fit: the combination is named, not either value.
    budget = (max(p.peak_bytes for p in at_80 if p is not by[64, 16]) + by[64, 16].peak_bytes) // 2
    problems = [str(p) for p in search.misfit_problems(search.plan_trials(spec, budget, "x"))]
    assert len(problems) == 1 and problems[0].startswith(
        "tune.space.peft.r: with peft.r=64, training.micro_batch_size=16: the trial needs"), problems
    # Nothing fits: one line about the base.
    problems = [str(p) for p in search.misfit_problems(search.plan_trials(spec, 2**20, "x"))]
    assert len(problems) == 1 and problems[0].startswith("tune.space: no planned trial fits"), problems


@pytest.mark.parametrize("use_gpu,force,refused", [(True, False, True), (True, True, False), (False, False, False)])
def test_a_gpu_search_with_trials_that_cannot_fit_is_refused_unless_forced(use_gpu, force, refused):
    from orchestrator.planning.budget import plan_for_run
    from orchestrator.search.recipe import check_trials_fit

    spec = tuned(SMALL_SPACE)
    peaks = sorted(p.peak_bytes for p in search.plan_trials(spec, 80 * 2**30, "given"))
    base = plan_for_run(spec, 1, (peaks[0] + peaks[-1]) // 2, source="the workers' GPU (test)")
    said = []
    if refused:
        with pytest.raises(SpecError) as e:
            check_trials_fit(spec, base, use_gpu=use_gpu, force=force, status=said.append)
        assert all(p.path.startswith("tune.space") for p in e.value.problems)
    else:  # every combination planned on the GPU; on CPUs nothing is checked
        assert len(check_trials_fit(spec, base, use_gpu=use_gpu, force=force, status=said.append)) == \
            (4 if use_gpu else 0)
    # On the GPU the plan is a line of the run's output; on CPUs only the trials' runs log theirs.
    assert bool(said) == use_gpu and all("the workers' GPU (test)" in s for s in said)


def records():
    R = search.TrialRecord
    return [R("a", {"peft.r": 4}, search.STOPPED, {"eval_loss": 0.1, "step": 20}),
            R("b", {"peft.r": 8}, search.COMPLETED, {"eval_loss": 0.5, "step": 60}),
            R("c", {"peft.r": 16}, search.COMPLETED, {"eval_loss": 0.3, "step": 60}),
            R("d", {"peft.r": 32}, search.FAILED, {})]


def test_best_trial_is_the_best_completed_one_and_the_table_is_ranked():
    trials = records()
    assert search.best_trial(trials, "eval_loss", "min").trial_id == "c"  # a is better but stopped early
    assert search.best_trial(trials, "eval_loss", "max").trial_id == "b"
    rows = search.trials_csv(trials, "eval_loss", "min").splitlines()
    assert rows[0] == "rank,trial_id,state,peft.r,planned_peak_bytes,eval_loss,step,run_id"
    assert [r.split(",")[1] for r in rows[1:]] == ["c", "b", "a", "d"]
    assert search.final_state(60, 60, False) == search.COMPLETED
    assert search.final_state(20, 60, False) == search.STOPPED
    assert search.final_state(60, 60, True) == search.FAILED


def _asha_decisions(scheduler, total_steps: int) -> list[str]:
    """A better and a worse trial each report evaluations 1..4 of a `total_steps`-step run (one
    evaluation a step), the better one first at each; the worse one's decisions."""
    from types import SimpleNamespace

    better, worse = SimpleNamespace(trial_id="better"), SimpleNamespace(trial_id="worse")
    for trial in (better, worse):
        scheduler.on_trial_add(None, trial)
    decisions = []
    for step in range(1, 5):
        for trial, loss in ((better, 1.0), (worse, 2.0)):
            result = {"training_iteration": step, "eval_loss": loss, "step": step, "total_steps": total_steps}
            action = scheduler.on_trial_result(None, trial, result)
            if trial is worse:
                decisions.append(action)
    return decisions


def test_asha_never_stops_a_trial_at_its_last_evaluation():
    """ASHA's rungs (1, 2, 4 evaluations here) can fall on a trial's last evaluation, where
    stopping it saves nothing and Tune would kill it while its Train run finishes."""
    from ray.tune.schedulers import ASHAScheduler

    from orchestrator.training.launch import asha_scheduler

    kwargs = dict(time_attr="training_iteration", max_t=5, grace_period=1, reduction_factor=2,
                  metric="eval_loss", mode="min")
    assert _asha_decisions(ASHAScheduler(**kwargs), total_steps=4)[3] == "STOP"  # plain ASHA does
    # Stopped at the rungs before its end, never at its end; a longer run is stopped at rung 4.
    assert _asha_decisions(asha_scheduler(**kwargs), total_steps=4) == ["STOP", "STOP", "CONTINUE", "CONTINUE"]
    assert _asha_decisions(asha_scheduler(**kwargs), total_steps=8)[3] == "STOP"
