"""The promotion gate: move an alias to a candidate version only when, evaluated on the same
examples as the version the gate compares against, it is not worse on the chosen metric."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.evaluation import metrics
from orchestrator.evaluation.evaluate import Evaluation, evaluate_versions
from orchestrator.spec import Problem, SpecError


@dataclass
class GateResult:
    promoted: bool
    version: str                   # the candidate
    alias: str
    metric: str
    previous: str | None           # the version the alias pointed at before
    incumbent: str | None          # the version compared against (None: nothing to compare against)
    candidate_value: float | None = None
    incumbent_value: float | None = None
    evaluation: Evaluation | None = None

    def to_json(self) -> dict:
        return {"promoted": self.promoted, "version": self.version, "alias": self.alias, "metric": self.metric,
                "previous": self.previous, "incumbent": self.incumbent, "candidate_value": self.candidate_value,
                "incumbent_value": self.incumbent_value,
                "evaluation_run_id": self.evaluation.run_id if self.evaluation else None,
                "comparison": self.evaluation.comparison() if self.evaluation else None}


def check_metric(metric: str, where: str = "--metric") -> None:
    if metric not in metrics.METRICS:
        raise SpecError([Problem(path=where, message=f"'{metric}' is not a metric",
                                 fix=f"use one of {', '.join(metrics.METRICS)}")])


def promote_if_better(uri: str, name: str, version: str, alias: str, if_better_than: str, metric: str = "eval_loss",
                      data_file: str | None = None, max_examples: int | None = None,
                      max_new_tokens: int = 64) -> GateResult:
    """Evaluate models:/NAME/VERSION against models:/NAME@IF_BETTER_THAN on the same examples and
    point `alias` at the candidate only if it is not worse on `metric`. When the alias compared
    against points nowhere (the model's first promotion) the candidate is promoted without a
    comparison. Every move is recorded with the evaluation run as its evidence."""
    from orchestrator.tracking.registry import alias_version, promote

    check_metric(metric)
    previous, incumbent = alias_version(uri, name, alias), alias_version(uri, name, if_better_than)
    result = GateResult(promoted=False, version=str(version), alias=alias, metric=metric, previous=previous,
                        incumbent=incumbent)
    if incumbent is None or incumbent == str(version):
        promote(uri, f"{name}/{version}", alias)
        result.promoted = True
        return result
    if metric in metrics.GENERATION_METRICS and max_new_tokens < 1:
        raise SpecError([Problem(path="--max-new-tokens", message="generation metrics need generated tokens",
                                 fix="set it to 1 or more")])
    # A loss gate needs no generations (they take most of an evaluation's time: 64 tokens per
    # example and model against one forward pass per batch).
    tokens = max_new_tokens if metric in metrics.GENERATION_METRICS else 0
    evaluation = evaluate_versions(uri, [f"models:/{name}/{version}", f"models:/{name}/{incumbent}"],
                                   data_file=data_file, max_examples=max_examples, max_new_tokens=tokens)
    result.evaluation = evaluation
    candidate, against = (r.metrics.get(metric) for r in evaluation.results)
    if candidate is None or against is None:
        raise SpecError([Problem(path="--metric", message=f"'{metric}' was not measured on {evaluation.data} "
                                 f"(format {evaluation.format} has no references)",
                                 fix="use eval_loss or perplexity, or a file with references (alpaca, chat)")])
    result.candidate_value, result.incumbent_value = candidate, against
    if metrics.not_worse(metric, candidate, against):
        promote(uri, f"{name}/{version}", alias, evidence_run_id=evaluation.run_id)
        result.promoted = True
    return result


def promote_after_run(spec, registered_model: dict, tracking_uri: str) -> GateResult | None:
    """The job's `registry.promote` gate for the version a run (or a search's best trial) just
    registered; None when the job sets no gate or registered nothing."""
    gate = spec.registry.promote
    if gate is None or not registered_model:
        return None
    return promote_if_better(tracking_uri, registered_model["name"], registered_model["version"], gate.alias,
                             gate.against, gate.metric, data_file=gate.data, max_examples=gate.max_examples,
                             max_new_tokens=gate.max_new_tokens)
