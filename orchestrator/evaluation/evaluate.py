"""`orchestrator evaluate`: one registered version (or two, side by side on the same examples) on
a held-out JSONL file: token-weighted loss and perplexity with the training's own tokenization,
masking and loss (`training.steps.evaluate`), and greedy generations scored against the
references. The result is logged as an MLflow evaluation run and onto the versions' tags."""

from __future__ import annotations

import gc
import math
import tempfile
from dataclasses import dataclass, field

from orchestrator.data.files import source_sha256
from orchestrator.data.formats import chat_key
from orchestrator.data.records import read_jsonl
from orchestrator.evaluation import metrics
from orchestrator.spec import DataSpec, Problem, SpecError

EVAL_BATCH = 8  # examples per forward pass for the loss


@dataclass
class Prompt:
    """One held-out record as the generation step sees it."""

    prompt: str            # what a person asked (for the table)
    text: str              # the prompt formatted as the model was trained, ready to complete
    reference: str | None  # the answer in the file (none for the text format)


@dataclass
class VersionResult:
    uri: str                    # models:/NAME/VERSION
    name: str
    version: str
    metrics: dict[str, float]
    outputs: list[str] = field(default_factory=list)
    scores: list[dict[str, float]] = field(default_factory=list)  # per example


@dataclass
class Evaluation:
    data: str
    format: str
    prompts: list[Prompt]
    results: list[VersionResult]  # the model, then the one it was compared against
    run_id: str | None = None

    def comparison(self) -> dict[str, dict[str, float]] | None:
        """For two versions: each metric's values and the first's difference to the second."""
        if len(self.results) < 2:
            return None
        a, b = self.results[0].metrics, self.results[1].metrics
        return {m: {"model": a[m], "against": b[m], "difference": a[m] - b[m],
                    "not_worse": metrics.not_worse(m, a[m], b[m])} for m in a if m in b}

    def rows(self) -> list[dict]:
        """One row per example: prompt, reference, each version's output and scores."""
        out = []
        for i, p in enumerate(self.prompts):
            row = {"prompt": p.prompt, "reference": p.reference or ""}
            for r in self.results:
                row[f"output {r.uri}"] = r.outputs[i] if r.outputs else ""
                for k, v in (r.scores[i] if r.scores else {}).items():
                    row[f"{k} {r.uri}"] = round(v, 4)
            if len(self.results) == 2 and self.results[0].scores:
                row["rougeL difference"] = round(self.results[0].scores[i]["rougeL"]
                                                 - self.results[1].scores[i]["rougeL"], 4)
            out.append(row)
        return out

    def to_json(self) -> dict:
        return {"data": self.data, "format": self.format, "run_id": self.run_id, "examples": len(self.prompts),
                "models": {r.uri: r.metrics for r in self.results}, "comparison": self.comparison(),
                "rows": self.rows()}


# --- data ----------------------------------------------------------------------------------------


def detect_format(record: dict, data: DataSpec) -> str:
    """A record's format from its fields: `messages` (or ShareGPT's `conversations`) is chat,
    `instruction` + `output` alpaca, the text field text; otherwise the job's own format (whose
    check then names what is missing)."""
    if chat_key(record):
        return "chat"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if data.text_field in record:
        return "text"
    return data.format


def to_prompt(record: dict, fmt: str, tokenizer) -> Prompt:
    from orchestrator.data.formats import prompt_and_reference

    return Prompt(*prompt_and_reference(record, fmt, tokenizer))


def held_out_records(spec, data_file: str | None, max_examples: int | None) -> tuple[str, str, list]:
    """(source, field path, (where, record) pairs): `data_file`, or the eval data of the version's
    own job (its eval source, or the seeded fraction of its training data it held out)."""
    from orchestrator.data.tokenize import split_records

    if data_file:
        records = [(f"{data_file}:{n}", r) for n, r in read_jsonl(data_file, "--data")]
        source, where = data_file, "--data"
    else:
        _, records, source, where = split_records(spec.data, spec.training.seed)
        if not records:
            raise SpecError([Problem(path="--data", message=f"the job of this version ({spec.name}) held out no "
                                     "eval data (data.eval is null)", fix="pass --data FILE, a JSONL file of "
                                     "held-out examples")])
    return source, where, records[:max_examples] if max_examples else records


# --- one model -----------------------------------------------------------------------------------


def evaluate_loaded(loaded, records: list[tuple[str, dict]], fmt: str, source: str, where: str,
                    max_new_tokens: int) -> tuple[float, list[Prompt], list[str]]:
    """Token-weighted mean loss of the records (prompt tokens masked, as in training) and the
    model's greedy completion of each record's prompt."""
    from orchestrator.data.tokenize import prepare_located
    from orchestrator.models.inference import complete_batch, input_device
    from orchestrator.training.steps import evaluate

    data = loaded.spec.data.model_copy(update={"format": fmt})
    examples, _ = prepare_located(records, data, loaded.tokenizer, where)
    loss = evaluate(loaded.model, examples, EVAL_BATCH, loaded.tokenizer.pad_token_id, 0, 1, input_device(loaded.model))
    prompts = [to_prompt(r, fmt, loaded.tokenizer) for _, r in records]
    if max_new_tokens < 1:  # the loss alone
        return loss, prompts, []
    done = iter(complete_batch(loaded, [p.text for p in prompts if p.reference is not None], max_new_tokens,
                               batch_size=EVAL_BATCH))
    return loss, prompts, [next(done) if p.reference is not None else "" for p in prompts]


def score(uri: str, name: str, version: str, loss: float, prompts: list[Prompt],
          outputs: list[str]) -> VersionResult:
    result = VersionResult(uri, name, version, {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))},
                           outputs=outputs)
    pairs = [(o, p.reference) for o, p in zip(outputs, prompts) if p.reference is not None]  # none without outputs
    if pairs:
        outs, refs = [o for o, _ in pairs], [r for _, r in pairs]
        result.scores = metrics.per_example(outs, refs)
        result.metrics.update(metrics.corpus(outs, refs, result.scores))
    return result


# --- versions ------------------------------------------------------------------------------------


def evaluate_versions(uri: str, refs: list[str], data_file: str | None = None, max_examples: int | None = None,
                      max_new_tokens: int = 64, log: bool = True) -> Evaluation:
    """Evaluate each registered version `refs` names (models:/NAME@ALIAS, models:/NAME/VERSION)
    on the same examples: `data_file`, else the first version's own eval data. With `log`, the
    result becomes an MLflow run in the first version's experiment, and each version's tags
    (`eval.<metric>`, `eval.run_id`) record it."""
    from orchestrator.models.inference import load_adapter, read_spec
    from orchestrator.tracking import evaluations
    from orchestrator.tracking.registry import download_model, resolve_version

    versions = [resolve_version(uri, ref) for ref in refs]
    results, prompts, source, fmt = [], [], "", ""
    records: list = []
    for i, v in enumerate(versions):
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = download_model(f"models:/{v.name}/{v.version}", tmp, uri)
            if i == 0:
                source, where, records = held_out_records(read_spec(model_dir), data_file, max_examples)
            loaded = load_adapter(model_dir)
        fmt = fmt or detect_format(records[0][1], loaded.spec.data)
        loss, prompts, outputs = evaluate_loaded(loaded, records, fmt, source, where, max_new_tokens)
        results.append(score(f"models:/{v.name}/{v.version}", v.name, str(v.version), loss, prompts, outputs))
        del loaded
        gc.collect()
    evaluation = Evaluation(data=str(source), format=fmt, prompts=prompts, results=results)
    if log:
        evaluation.run_id = evaluations.log_evaluation(
            uri, versions[0].run_id, run_name=f"evaluate {results[0].uri.removeprefix('models:/')}"
            + (f" vs {results[1].uri.removeprefix('models:/')}" if len(results) > 1 else ""),
            models=[(r.name, r.version, r.metrics) for r in results], rows=evaluation.rows(),
            tags={"eval.data": str(source), "eval.data_sha256": source_sha256(str(source)),
                  "eval.format": fmt, "eval.examples": str(len(prompts))})
    return evaluation
