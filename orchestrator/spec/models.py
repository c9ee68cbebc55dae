"""The job spec: one typed, validated description of a fine-tuning job.

Everything a run does follows from a `JobSpec`. It is loaded from one YAML file plus
`--set dotted.path=value` overrides (`spec.loading`); every problem (unknown keys, wrong types,
values out of range, combinations that cannot work, missing files) is collected and raised at once
as a `SpecError` (`spec.problems`, `spec.checks`). `redact_uri` lives here because
`JobSpec.public_dict` uses it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field

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
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="attention kernel: auto (sdpa where the architecture supports it, else eager; "
        "Gemma-2 has no sdpa), sdpa, eager, or flash_attention_2 (GPUs with the flash-attn package; "
        "packed rows then run padding-free)")


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
    train: str = Field(description="the training data: a JSONL (or .jsonl.gz / .zst / .bz2 / .lz4) or Parquet file, "
                                   "a directory or glob of them (relative to the job file), or an s3:// / gs:// URI")
    # An eval source (as `train`), or the fraction of `train` held out for evaluation.
    eval: Union[float, str, None] = Field(
        0.1, description="an eval source (as train), or the fraction of train's records held out for evaluation "
                         "(each record by a seeded hash of its content); null: no evaluation (a search ranked by eval_loss, "
                         "and a promotion gate without its own data, need one)")
    format: Literal["alpaca", "chat", "text"] = Field("alpaca", description="the records' format (see Data formats)")
    max_seq_len: int = Field(512, ge=8, le=1_048_576, description="tokens per example")
    # Examples longer than max_seq_len: cut to it (counted in the run summary), or refused.
    too_long: Literal["truncate", "error"] = Field(
        "truncate", description="examples longer than max_seq_len: cut (counted in the summary) or refused")
    text_field: str = Field("text", description="format text: the field that holds the text")
    packing: bool = Field(
        False, description="pack several examples into each max_seq_len row (positions restart and attention "
                           "stays within each example); micro_batch_size then counts rows")
    # The first step need not wait for a large data set's tokenizing (a run with max_steps needs
    # no count up front); the readers follow the Parquet parts as they are written.
    train_while_tokenizing: bool = Field(
        True, description="with training.max_steps set, a large source (over 16 MiB, or remote) not yet in the cache "
                          "is tokenized while the job trains: the first step waits for its first shuffle window "
                          "(4,096 examples), not the whole file (the run's data counts come at its end; one node "
                          "only); false: tokenize it all first")
    # A tokenizer without a chat template (a base model's, often) cannot render chat records.
    chat_template: str | None = Field(
        None, description="format chat: a Jinja chat template, or a file holding one (relative to the job file; "
                          "read into the spec when it loads); null: the tokenizer's own")


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
    eval_batches: int | None = Field(
        None, ge=1, description="cap on eval batches (of micro_batch_size examples) per worker per evaluation; "
                                "null: 32")
    # A few fixed eval prompts completed at each evaluation (rank 0, greedy, 24 new tokens: about
    # a second on the demo model) and logged as the run's generations table; not under ZeRO-3.
    generations: int = Field(
        3, ge=0, le=32,
        description="eval prompts completed at each evaluation, logged as a table (0: none; skipped under ZeRO-3)")
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


class PromoteSpec(_Section):
    # The promotion gate after each run (and a search's best trial): the registered version is
    # evaluated against the one `if_better_than` names, on the same data, and `alias` moves to
    # it only when it is not worse on `metric` (registry.md, Evaluate and promote on evidence).
    alias: str = Field("production", description="alias to move to the new version when it passes the gate")
    if_better_than: str | None = Field(
        None, description="alias of the version to beat (null: the alias itself); if it points nowhere, no gate")
    metric: Literal["eval_loss", "perplexity", "exact_match", "rougeL", "chrf", "bleu"] = Field(
        "eval_loss", description="the metric compared; eval_loss and perplexity lower is better, the others higher")
    data: str | None = Field(
        None, description="held-out JSONL file for the gate, relative to the job file (null: the job's eval data)")
    max_examples: int | None = Field(None, ge=1, description="evaluate the first N examples only (null: all)")
    max_new_tokens: int = Field(64, ge=0, description="tokens generated per example for the generation metrics")

    @property
    def against(self) -> str:
        return self.if_better_than or self.alias


class RegistrySpec(_Section):
    name: str | None = Field(None, description="registered model name (null: the job name)")
    # adapter: LoRA weights + a reference to the base (small); merged: base + adapter merged into
    # one plain transformers model (no peft needed to load it); both: NAME and NAME-merged.
    mode: Literal["adapter", "merged", "both"] = Field(
        "adapter", description="what a version holds: the adapter, the merged model, or both (see registry.md)")
    alias: str = Field("candidate", description="alias pointed at each new version")
    promote: PromoteSpec | None = Field(
        None, description="after the run, move another alias (production) to the new version only on evidence")


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
        """A short content hash of the spec: equal specs give equal hashes. Credentials are not
        part of a job: a user:password@ in `tracking.uri` is left out, so a job whose password
        moved to MLFLOW_TRACKING_PASSWORD (or changed) is the same job, and no secret is hashed
        into the tags that carry this."""
        canonical = json.dumps(self.public_dict(), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def public_dict(self) -> dict:
        """The spec as plain data, safe to log: a user:password@ in `tracking.uri` is left out
        (credentials belong in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)."""
        data = self.model_dump(mode="json")
        data["tracking"]["uri"] = redact_uri(data["tracking"]["uri"])
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.public_dict(), sort_keys=False)


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
