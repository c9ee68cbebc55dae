"""The job spec: one typed, validated description of a fine-tuning job.

Everything a run does follows from a `JobSpec`. It is loaded from one YAML file plus
`--set dotted.path=value` overrides; every problem (unknown keys, wrong types, values out
of range, combinations that cannot work, missing files) is collected and raised at once
as a `SpecError` whose lines read `dotted.path: what is wrong. Fix: what to do`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

# The file name a spec is saved under wherever it travels: run artifacts, saved adapters,
# submitted job packages.
SPEC_FILE = "job.yaml"

# Target-module presets, resolved against the model's module names when the adapter is built.
TARGET_MODULE_PRESETS = ("attention", "mlp", "all-linear")

# The three classes of parameter-efficient fine-tuning, plus the full fine-tuning baseline:
# reparameterization (lora), additive (ia3, prompt_tuning, prefix_tuning, adaption_prompt) and
# selective (freeze: train a named subset of the model's own weights, no adapter).
PEFT_METHODS = ("lora", "ia3", "prompt_tuning", "prefix_tuning", "adaption_prompt", "freeze", "full")
# The fields of `peft` that only one method reads (r, alpha, dropout and target_modules keep
# their defaults whatever the method, so that one job file can switch methods with --set).
METHOD_FIELDS = {
    "lora": ("use_dora", "use_rslora"),
    "prompt_tuning": ("num_virtual_tokens", "init_text"),
    "prefix_tuning": ("num_virtual_tokens",),
    "adaption_prompt": ("adapter_len", "adapter_layers"),
    "freeze": ("trainable_patterns", "last_n_layers"),
}
# Methods whose adapter can be folded into the base weights (registry.mode merged/both); a
# freeze job "merges" by writing its trained tensors into the base.
MERGEABLE_METHODS = ("lora", "ia3", "freeze")
# Methods that train the base's own weights, so the base cannot be quantized.
BASE_TRAINING_METHODS = ("freeze", "full")
DEFAULT_VIRTUAL_TOKENS = 20
DEFAULT_ADAPTER_LEN = 10
DATA_FORMATS = ("alpaca", "chat", "text")


class Problem(BaseModel):
    """One thing wrong with a spec: where, what, and how to fix it."""

    path: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        fix = f" Fix: {self.fix}" if self.fix else ""
        return f"{self.path}: {self.message}.{fix}"


class SpecError(Exception):
    """A job spec with one or more problems; `str()` gives one line per problem."""

    def __init__(self, problems: list[Problem], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s){where}:\n{lines}")


class _Section(BaseModel):
    # Unknown keys are an error, never silently ignored (a typo must cost seconds, not a GPU hour).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Section):
    base: str = Field("builtin:tiny-llama", description="local directory, hub id, or builtin:NAME")
    revision: str | None = Field(None, description="the hub revision (branch, tag or commit) of `base`")
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype of the unquantized weights and of the compute")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass: less memory, more compute")
    trust_remote_code: bool = Field(
        False, description="run model code shipped with a hub model (false unless the job sets it)")


class QuantizationSpec(_Section):
    bits: Literal[4, 8] | None = Field(
        4, description="load the base 4-bit (QLoRA) or 8-bit with bitsandbytes; null: unquantized")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type")
    double_quant: bool = Field(True, description="quantize the quantization constants too (4-bit)")


class PeftSpec(_Section):
    # `full` trains every weight, with no adapter (`orchestrator plan` shows what PEFT saves).
    method: Literal["lora", "ia3", "prompt_tuning", "prefix_tuning", "adaption_prompt", "freeze", "full"] = Field(
        "lora", description="the PEFT method; a field that only another method reads is an error (see peft-methods.md)")
    # lora
    r: int = Field(8, ge=1, le=1024, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (alpha / r)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    # lora and ia3 (ia3's feed-forward modules are the chosen ones inside the MLP)
    target_modules: Union[str, list[str]] = Field(
        "all-linear", description="lora, ia3: a preset (attention, mlp, all-linear) or a list of module names")
    use_dora: bool = Field(False, description="lora: weight-decomposed LoRA (DoRA)")  # weight-decomposed LoRA (DoRA)
    use_rslora: bool = Field(  # rank-stabilized scaling alpha / sqrt(r)
        False, description="lora: rank-stabilized scaling alpha / sqrt(r)")
    # prompt_tuning, prefix_tuning (default 20)
    num_virtual_tokens: int | None = Field(
        None, ge=1, le=4096, description="prompt_tuning, prefix_tuning: virtual tokens (null: 20)")
    init_text: str | None = Field(None, min_length=1, description="prompt_tuning: initialise from this text")
    # adaption_prompt (LLaMA-Adapter): prompt length (default 10), top layers to adapt (default all)
    adapter_len: int | None = Field(None, ge=1, le=4096, description="adaption_prompt: prompt length (null: 10)")
    adapter_layers: int | None = Field(
        None, ge=1, description="adaption_prompt: top layers to adapt (null: all)")
    # freeze: train the parameters whose names match a regular expression, and/or the last N blocks
    trainable_patterns: list[str] | None = Field(
        None, description="freeze: train the parameters whose names match one of these regular expressions")
    last_n_layers: int | None = Field(None, ge=1, description="freeze: train the last N decoder blocks")

    @property
    def virtual_tokens(self) -> int:
        return self.num_virtual_tokens or DEFAULT_VIRTUAL_TOKENS

    @property
    def prompt_len(self) -> int:
        return self.adapter_len or DEFAULT_ADAPTER_LEN


class DataSpec(_Section):
    train: str = Field(description="the training data: a JSONL file, relative to the job file")
    # A path to an eval file, or the fraction of `train` held out for evaluation.
    eval: Union[float, str, None] = Field(
        0.1, description="an eval JSONL file, or the fraction of `train` held out for evaluation")
    format: Literal["alpaca", "chat", "text"] = Field("alpaca", description="the records' format (see Data formats)")
    max_seq_len: int = Field(512, ge=8, le=1_048_576, description="tokens per example")
    # Examples longer than max_seq_len: cut to it (counted in the run summary), or refused.
    too_long: Literal["truncate", "error"] = Field(
        "truncate", description="examples longer than max_seq_len: cut (counted in the summary) or refused")
    text_field: str = Field("text", description="format text: the field that holds the text")


class TrainingSpec(_Section):
    max_steps: int | None = Field(None, ge=1, description="optimizer steps to train (set this or epochs)")
    epochs: float | None = Field(None, gt=0, description="passes over the training data (set this or max_steps)")
    micro_batch_size: int = Field(4, ge=1, description="examples per worker per forward pass")
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated per optimizer step")
    learning_rate: float = Field(2e-4, gt=0, le=1.0, description="peak learning rate")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="learning-rate schedule after warm-up")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="share of the steps spent warming up")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, ge=0.0, description="gradient clipping norm")
    seed: int = Field(42, description="seeds the eval split, the data order and the workers' RNGs")
    eval_every: int = Field(50, ge=1, description="evaluate every N steps (a search reports to Tune then)")
    eval_batches: int | None = Field(None, ge=1, description="cap on eval batches per evaluation")
    checkpoint_every: int | None = Field(
        None, ge=1, description="also checkpoint to storage.path every N steps (null: at the end only)")


class DeepSpeedSpec(_Section):
    stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage")
    offload_optimizer: bool = Field(False, description="keep optimizer states in host memory (stage 1-3)")
    offload_params: bool = Field(False, description="keep parameters in host memory (stage 3)")


class DistributedSpec(_Section):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (one process, and one GPU if used, each)")
    use_gpu: Union[bool, Literal["auto"]] = Field(
        "auto", description="auto: use GPUs when the cluster has them when the job starts")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs each worker reserves")
    deepspeed: DeepSpeedSpec = Field(DeepSpeedSpec(), description="DeepSpeed ZeRO settings")
    max_failures: int = Field(
        0, ge=-1, description="restarts of the worker group after a worker dies (-1: always)")


class TrackingSpec(_Section):
    uri: str = Field(
        "sqlite:///mlflow.db",
        description="MLflow tracking URI: a sqlite file in the working directory, or an http:// server for teams")
    experiment: str | None = Field(None, description="MLflow experiment (null: the job name)")


class RegistrySpec(_Section):
    name: str | None = Field(None, description="registered model name (null: the job name)")
    # adapter: LoRA weights + a reference to the base (small); merged: base + adapter merged into
    # one plain transformers model (no peft needed to load it); both: NAME and NAME-merged.
    mode: Literal["adapter", "merged", "both"] = Field(
        "adapter", description="what a version holds: the adapter, the merged model, or both (see registry.md)")
    alias: str = Field("candidate", description="alias pointed at each new version")


class StorageSpec(_Section):
    # Where Ray Train persists checkpoints and results; relative paths are relative to the
    # working directory of the driver. A URI (s3://bucket/prefix, gs://...) is used as is.
    path: str = Field(
        "runs", description="where Ray Train keeps checkpoints and results; on a cluster an absolute path or s3://...")
    # True when `path` is a filesystem mounted at the same place on every node (NFS, EFS, a
    # shared PVC). Once a job's workers span nodes, a local path must be shared: each worker
    # writes its checkpoint where it runs and the driver reads it back on the head node.
    shared: bool = Field(False, description="true when `path` is mounted at the same place on every node")


class SchedulerSpec(_Section):
    # asha: stop trials whose metric trails the others' at each rung; none: run every trial out.
    type: Literal["asha", "none"] = Field(
        "asha", description="asha: stop trials that trail at each rung; none: run every trial out")
    # Counted in evaluations (one every training.eval_every steps): a trial is first judged after
    # grace_period evaluations, then at grace_period x reduction_factor^k.
    grace_period: int = Field(1, ge=1, description="evaluations before a trial is first judged")
    reduction_factor: float = Field(2.0, gt=1.0, description="later rungs at grace_period x reduction_factor^k")


class DomainSpec(_Section):
    """One searched value: exactly one of `choice` (a list), `uniform`, `loguniform` or `randint`
    (`[low, high]`, both ends included)."""

    choice: list[Any] | None = Field(None, min_length=1, description="one of these values")
    uniform: tuple[float, float] | None = Field(None, description="[low, high], uniformly")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high], uniformly in log space")
    randint: tuple[int, int] | None = Field(None, description="[low, high], a whole number, both ends included")

    @property
    def kind(self) -> str | None:
        set_ = [k for k in ("choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        return set_[0] if len(set_) == 1 else None


class TuneSpec(_Section):
    """A hyperparameter search over the job: each trial is the job with the `space` values set."""

    metric: str = Field("eval_loss", description="the metric trials are ranked by: eval_loss or train_loss")
    mode: Literal["min", "max"] = Field("min", description="whether lower or higher metric is better")
    num_samples: int = Field(8, ge=1, description="trials")
    # Trials running at once; each takes distributed.num_workers x cpus_per_worker CPUs (or GPUs).
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="trials running at once (null: as many as the cluster holds now)")
    scheduler: SchedulerSpec = Field(SchedulerSpec(), description="the trial scheduler")
    search_alg: Literal["optuna", "random"] = Field("optuna", description="how trial values are picked")
    time_budget_s: float | None = Field(None, gt=0, description="stop the search after this many seconds")
    seed: int | None = Field(0, description="seed of the search algorithm")
    space: dict[str, DomainSpec] = Field(
        default_factory=dict, description="dotted path of a job setting -> its searched values")


class JobSpec(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
                      description="job name (letters, digits, ., _, -); the default experiment and registered name")
    model: ModelSpec = Field(ModelSpec(), description="the base model")
    quantization: QuantizationSpec = Field(QuantizationSpec(), description="how the base is quantized (bitsandbytes)")
    peft: PeftSpec = Field(PeftSpec(), description="the PEFT method and its fields")
    data: DataSpec = Field(description="training and evaluation data")
    training: TrainingSpec = Field(TrainingSpec(), description="steps, batches, optimizer, evaluation and checkpoints")
    distributed: DistributedSpec = Field(DistributedSpec(), description="Ray Train workers and DeepSpeed")
    tracking: TrackingSpec = Field(TrackingSpec(), description="MLflow tracking")
    registry: RegistrySpec = Field(RegistrySpec(), description="the MLflow model registry")
    storage: StorageSpec = Field(StorageSpec(), description="Ray Train's checkpoint and result storage")
    tune: TuneSpec | None = Field(
        None, description="optional: turns the job into a hyperparameter search (see search.md)")

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def registered_name(self) -> str:
        return self.registry.name or self.name

    def spec_hash(self) -> str:
        """A short content hash of the spec: equal specs give equal hashes."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def public_dict(self) -> dict:
        """The spec as plain data, safe to log: a user:password@ in `tracking.uri` is left out
        (credentials belong in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)."""
        data = self.model_dump(mode="json")
        data["tracking"]["uri"] = redact_uri(data["tracking"]["uri"])
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.public_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------
# Loading: YAML + overrides -> raw dict -> JobSpec, with every problem reported at once.
# ---------------------------------------------------------------------------------------


def apply_overrides(raw: dict, overrides: list[str]) -> list[Problem]:
    """Apply `dotted.path=value` overrides to `raw` in place; values are parsed as YAML."""
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(Problem(path=f"--set {item}", message="not of the form dotted.path=value",
                                    fix="write e.g. --set training.max_steps=100"))
            continue
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(Problem(path=key, message=f"'{part}' is a value, not a section",
                                        fix="override the value itself"))
                break
            node = child
        else:
            node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    return problems


def _spec_path(loc: tuple) -> tuple[list[str], type[BaseModel] | None]:
    """The spec keys in a pydantic error location, and the section model that owns the last one.

    pydantic adds union member names (`float`, `literal['auto']`) and list indexes to
    locations; they are not keys a user can write, so the walk stops at them.
    """
    keys: list[str] = []
    model: Any = JobSpec
    owner: type[BaseModel] | None = JobSpec
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        fields = getattr(model, "model_fields", None)
        if not isinstance(part, str) or fields is None:
            break
        owner = model
        keys.append(part)
        if part not in fields:
            break
        model = _section_type(fields[part].annotation)
        if typing.get_origin(model) is dict:  # tune.space: the next part is a key the user wrote
            if parts and isinstance(parts[0], str):
                keys.append(parts.pop(0))
            model = _section_type(typing.get_args(model)[1])
    return keys, owner


def _section_type(annotation: Any) -> Any:
    """`Section | None` -> `Section`; anything else as it is."""
    members = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (Union, types.UnionType) and len(members) == 1:
        return members[0]
    return annotation


def _problem_from_pydantic(err: dict) -> Problem:
    keys, owner = _spec_path(tuple(err["loc"]))
    path = ".".join(keys) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        valid = sorted(owner.model_fields) if owner else []
        close = difflib.get_close_matches(keys[-1], valid, n=1) if keys else []
        hint = f"did you mean '{close[0]}'? " if close else ""
        return Problem(path=path, message="unknown key", fix=f"{hint}valid keys here: {', '.join(valid)}")
    if kind == "missing":
        return Problem(path=path, message="required key is missing", fix="add it to the job file")
    got = err.get("input")
    got_s = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
    fix = _FIXES.get(kind) or _FIXES.get(kind.split("_")[0], "correct the value")
    if path == "name" and kind == "string_pattern_mismatch":
        fix = "use letters, digits, '.', '_' and '-' only, starting with a letter or digit"
    return Problem(path=path, message=f"{err['msg']}{got_s}", fix=fix)


_FIXES = {
    "literal_error": "use one of the values listed",
    "greater": "use a larger value",
    "less": "use a smaller value",
    "bool": "use true or false",
    "int": "use a whole number",
    "float": "use a number",
    "string": "use a text value",
    "dict": "write it as a section of keys",
}


def _drop(raw: dict, loc: tuple) -> None:
    """Remove the key at `loc` from `raw` (so a re-validation falls back to its default)."""
    node: Any = raw
    for part in loc[:-1]:
        if not isinstance(node, dict) or not isinstance(node.get(part), dict):
            return
        node = node[part]
    if isinstance(node, dict):
        node.pop(loc[-1], None)


def _dedupe(problems: list[Problem]) -> list[Problem]:
    # A union field reports one error per member type; one line per field is enough.
    seen, out = set(), []
    for p in problems:
        if p.path not in seen:
            seen.add(p.path)
            out.append(p)
    return out


def semantic_problems(spec: JobSpec, base_dir: Path | None = None) -> list[Problem]:
    """Cross-field and filesystem checks that a single field's type cannot express."""
    problems: list[Problem] = []
    t, d, ds = spec.training, spec.data, spec.distributed.deepspeed
    if t.max_steps is None and t.epochs is None:
        problems.append(Problem(path="training.max_steps", message="neither max_steps nor epochs is set",
                                fix="set training.max_steps (or training.epochs)"))
    if t.max_steps is not None and t.epochs is not None:
        problems.append(Problem(path="training.epochs", message="both max_steps and epochs are set",
                                fix="keep one of training.max_steps and training.epochs"))
    if ds.offload_params and ds.stage != 3:
        problems.append(Problem(path="distributed.deepspeed.offload_params",
                                message="parameter offload needs ZeRO stage 3",
                                fix="set distributed.deepspeed.stage=3 or offload_params=false"))
    if ds.offload_optimizer and ds.stage == 0:
        problems.append(Problem(path="distributed.deepspeed.offload_optimizer",
                                message="optimizer offload needs ZeRO stage 1, 2 or 3",
                                fix="set distributed.deepspeed.stage to 2 or 3"))
    q = spec.quantization
    if q.bits is not None and spec.model.dtype == "float32" and ds.stage == 3:
        problems.append(Problem(path="model.dtype",
                                message="ZeRO-3 with a quantized base needs a 16-bit dtype",
                                fix="set model.dtype=bfloat16"))
    problems += peft_problems(spec)
    tm = spec.peft.target_modules
    if isinstance(tm, str) and tm not in TARGET_MODULE_PRESETS:
        problems.append(Problem(path="peft.target_modules",
                                message=f"unknown preset '{tm}'",
                                fix=f"use one of {', '.join(TARGET_MODULE_PRESETS)} or a list of module names"))
    if isinstance(tm, list) and not tm:
        problems.append(Problem(path="peft.target_modules", message="empty list",
                                fix="name at least one module, or use a preset such as all-linear"))
    if isinstance(d.eval, float) and not 0.0 < d.eval < 1.0:
        problems.append(Problem(path="data.eval", message=f"eval fraction {d.eval} is not between 0 and 1",
                                fix="use e.g. 0.1, or a path to an eval file"))
    if t.checkpoint_every is not None and t.max_steps is not None and t.checkpoint_every > t.max_steps:
        problems.append(Problem(path="training.checkpoint_every",
                                message=f"{t.checkpoint_every} is beyond max_steps ({t.max_steps})",
                                fix="lower it or leave it unset (the final adapter is always saved)"))
    if spec.tune is not None:
        problems += tune_problems(spec)
    if base_dir is not None:
        for field in ("train", "eval"):
            value = getattr(d, field)
            if isinstance(value, str) and not resolve_path(value, base_dir).is_file():
                problems.append(Problem(path=f"data.{field}",
                                        message=f"file not found: {value} (looked in {resolve_path(value, base_dir)})",
                                        fix="point it at an existing JSONL file (paths are relative to the job file)"))
        base = spec.model.base
        if not base.startswith("builtin:") and (base.startswith((".", "/", "~")) or Path(base).exists()):
            p = resolve_path(base, base_dir)
            if not (p / "config.json").is_file():
                problems.append(Problem(path="model.base", message=f"no model directory with a config.json at {p}",
                                        fix="point it at a saved transformers model, or use builtin:tiny-llama"))
    return problems


def peft_problems(spec: JobSpec) -> list[Problem]:
    """Fields of another method, and methods that cannot work with the rest of the job."""
    import re

    p, method = spec.peft, spec.peft.method
    problems: list[Problem] = []
    defaults = PeftSpec()
    for name in dict.fromkeys(f for fields in METHOD_FIELDS.values() for f in fields):
        users = [m for m, fields in METHOD_FIELDS.items() if name in fields]
        if method not in users and getattr(p, name) != getattr(defaults, name):
            problems.append(Problem(path=f"peft.{name}",
                                    message=f"only peft.method {' or '.join(users)} reads it, this job is {method}",
                                    fix=f"remove peft.{name}, or set peft.method={users[0]}"))
    bits = spec.quantization.bits
    if method in BASE_TRAINING_METHODS and bits is not None:
        what = "full fine-tuning" if method == "full" else "freeze"
        problems.append(Problem(path="quantization.bits", message=f"{what} trains the base's own weights, "
                                                                  f"which cannot be trained {bits}-bit quantized",
                                fix="set quantization.bits=null (or use lora on the quantized base: QLoRA)"))
    if spec.registry.mode != "adapter" and method not in MERGEABLE_METHODS:
        what = ("full fine-tuning has no adapter to merge" if method == "full" else
                f"{method} adapters cannot be merged into the base weights")
        fix = ("leave registry.mode at adapter (a full fine-tune is registered as a whole model)"
               if method == "full" else f"set registry.mode=adapter, or use one of {', '.join(MERGEABLE_METHODS)}")
        problems.append(Problem(path="registry.mode", message=f"'{spec.registry.mode}': {what}", fix=fix))
    if method == "freeze":
        if not p.trainable_patterns and p.last_n_layers is None:
            problems.append(Problem(path="peft.trainable_patterns", message="freeze needs something to train",
                                    fix="set peft.trainable_patterns (e.g. [norm, lm_head]) and/or peft.last_n_layers"))
        for i, pattern in enumerate(p.trainable_patterns or []):
            try:
                re.compile(pattern)
            except re.error as e:
                problems.append(Problem(path=f"peft.trainable_patterns.{i}",
                                        message=f"not a regular expression ({e})",
                                        fix="write a Python regular expression, e.g. 'layers\\.2\\.mlp' or 'norm'"))
    # No ZeRO-3 check: every method trains, saves and registers under ZeRO-3 with 2 workers (each
    # tried: lora on a 4-bit base and unquantized, the others unquantized); save_trained gathers
    # the partitioned trainable tensors first.
    return problems


# What the worker loop reports to Ray at every evaluation: the metrics a search can rank trials by.
TUNE_METRICS = ("eval_loss", "train_loss")


def tune_problems(spec: JobSpec) -> list[Problem]:
    """The `tune` section's own shape: one kind per searched value, ranges the right way round,
    a metric the trials report. (Whether every value makes a valid job is `search.space_problems`.)"""
    tune, t = spec.tune, spec.training
    problems: list[Problem] = []
    if tune.metric not in TUNE_METRICS:
        problems.append(Problem(path="tune.metric", message=f"'{tune.metric}' is not reported by the trials",
                                fix=f"use one of {', '.join(TUNE_METRICS)}"))
    if not tune.space:
        problems.append(Problem(path="tune.space", message="nothing to search",
                                fix="add e.g. 'peft.r: {choice: [4, 8, 16]}' under tune.space"))
    if t.checkpoint_every is not None and t.checkpoint_every % t.eval_every:
        # Every report to Tune must carry the metric; a checkpoint between evaluations would not.
        problems.append(Problem(path="training.checkpoint_every",
                                message=f"{t.checkpoint_every} is not a multiple of training.eval_every "
                                        f"({t.eval_every}) in a search",
                                fix="leave it unset or make it a multiple of training.eval_every"))
    for path, domain in tune.space.items():
        where = f"tune.space.{path}"
        if path == "tune" or path.startswith("tune.") or path == "name":
            problems.append(Problem(path=where, message=f"'{path}' cannot be searched",
                                    fix="search job settings such as peft.r or training.learning_rate"))
        kind = domain.kind
        if kind is None:
            problems.append(Problem(path=where, message="give exactly one of choice, uniform, loguniform, randint",
                                    fix="write e.g. {choice: [4, 8, 16]} or {loguniform: [1.0e-4, 1.0e-2]}"))
            continue
        if kind == "choice":
            continue
        low, high = getattr(domain, kind)
        if not low < high:
            problems.append(Problem(path=where, message=f"{kind} range [{low}, {high}] is empty",
                                    fix="write [low, high] with low < high"))
        elif kind == "loguniform" and low <= 0:
            problems.append(Problem(path=where, message=f"loguniform needs a positive low end (got {low})",
                                    fix="use a low end above 0, or a uniform range"))
    return problems


def redact_uri(uri: str) -> str:
    """A URI without its user:password@ part, for logs, artifacts, messages and metadata."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(uri)
        if not parts.password and not parts.username:
            return uri
    except ValueError:  # not a URI: nothing to redact
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=netloc).geturl()


def resolve_path(value: str, base_dir: Path) -> Path:
    """Paths in a job file are relative to the file's own directory."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base_dir / p).resolve()


def parse_spec(raw: Any, base_dir: Path | None = None, source: str | None = None) -> JobSpec:
    """Validate a raw mapping into a `JobSpec`, or raise `SpecError` listing every problem."""
    if not isinstance(raw, dict):
        raise SpecError([Problem(path="(top level)", message="the job file is not a mapping of sections",
                                 fix="start from jobs/quickstart.yaml")], source)
    problems: list[Problem] = []
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as e:
        problems = _dedupe([_problem_from_pydantic(err) for err in e.errors()])
        spec = _partial_spec(raw, e)
    if spec is not None:
        reported = {p.path for p in problems}
        problems += [p for p in semantic_problems(spec, base_dir) if p.path not in reported]
    if problems:
        raise SpecError(problems, source)
    if base_dir is not None:
        # Make file references absolute so the spec means the same thing wherever it travels.
        d = spec.data
        d.train = str(resolve_path(d.train, base_dir))
        if isinstance(d.eval, str):
            d.eval = str(resolve_path(d.eval, base_dir))
        base = spec.model.base
        if not base.startswith("builtin:") and (base.startswith((".", "/", "~")) or Path(base).exists()):
            spec.model.base = str(resolve_path(base, base_dir))
    return spec


def _partial_spec(raw: dict, error: ValidationError) -> JobSpec | None:
    """The spec with every invalid key dropped (defaults in its place), so that the
    cross-field checks can still report their problems in the same pass."""
    import copy

    raw = copy.deepcopy(raw)
    for err in error.errors():
        keys, _ = _spec_path(tuple(err["loc"]))
        if keys:
            _drop(raw, tuple(keys))
    raw.setdefault("name", "x")
    if not isinstance(raw.get("data"), dict):
        raw["data"] = {}
    raw["data"].setdefault("train", "")
    try:
        return JobSpec.model_validate(raw)
    except ValidationError:
        return None


def _yaml_error_line(e: Exception) -> str:
    """One line saying where the YAML breaks and why (PyYAML's own text spans several)."""
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        where = f"line {mark.line + 1}, column {mark.column + 1}"
    elif getattr(e, "position", None) is not None:  # a reader error: a character YAML forbids
        where = f"character {e.position}"
    else:
        where = "an unknown place"
    why = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e)
    return " ".join(f"malformed YAML at {where}: {why}".split())


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Read a job file, apply overrides, validate. Raises `SpecError` with every problem."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise SpecError([Problem(path="(file)", message=f"job file not found: {path}",
                                 fix="pass the path of a YAML job file, e.g. jobs/quickstart.yaml")])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SpecError([Problem(path="(file)", message=_yaml_error_line(e), fix="fix the YAML syntax")],
                        source) from None
    except UnicodeDecodeError:
        raise SpecError([Problem(path="(file)", message="not UTF-8 text", fix="save it as UTF-8")], source) from None
    raw = raw if raw is not None else {}
    problems = apply_overrides(raw, overrides or []) if isinstance(raw, dict) else []
    if problems:
        raise SpecError(problems, source)
    return parse_spec(raw, base_dir=path.parent.resolve(), source=source)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
