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
    revision: str | None = None
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False


class QuantizationSpec(_Section):
    bits: Literal[4, 8] | None = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True


class PeftSpec(_Section):
    # `full` trains every weight, with no adapter (`orchestrator plan` shows what PEFT saves).
    method: Literal["lora", "ia3", "prompt_tuning", "prefix_tuning", "adaption_prompt", "freeze", "full"] = "lora"
    # lora
    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # lora and ia3 (ia3's feed-forward modules are the chosen ones inside the MLP)
    target_modules: Union[str, list[str]] = "all-linear"
    use_dora: bool = False  # weight-decomposed LoRA (DoRA)
    use_rslora: bool = False  # rank-stabilized scaling alpha / sqrt(r)
    # prompt_tuning, prefix_tuning (default 20)
    num_virtual_tokens: int | None = Field(None, ge=1, le=4096)
    init_text: str | None = Field(None, min_length=1, description="prompt_tuning: initialise from this text")
    # adaption_prompt (LLaMA-Adapter): prompt length (default 10), top layers to adapt (default all)
    adapter_len: int | None = Field(None, ge=1, le=4096)
    adapter_layers: int | None = Field(None, ge=1)
    # freeze: train the parameters whose names match a regular expression, and/or the last N blocks
    trainable_patterns: list[str] | None = None
    last_n_layers: int | None = Field(None, ge=1)

    @property
    def virtual_tokens(self) -> int:
        return self.num_virtual_tokens or DEFAULT_VIRTUAL_TOKENS

    @property
    def prompt_len(self) -> int:
        return self.adapter_len or DEFAULT_ADAPTER_LEN


class DataSpec(_Section):
    train: str
    # A path to an eval file, or the fraction of `train` held out for evaluation.
    eval: Union[float, str, None] = 0.1
    format: Literal["alpaca", "chat", "text"] = "alpaca"
    max_seq_len: int = Field(512, ge=8, le=1_048_576)
    # Examples longer than max_seq_len: cut to it (counted in the run summary), or refused.
    too_long: Literal["truncate", "error"] = "truncate"
    text_field: str = "text"


class TrainingSpec(_Section):
    max_steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    micro_batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0)
    seed: int = 42
    eval_every: int = Field(50, ge=1)
    eval_batches: int | None = Field(None, ge=1, description="cap on eval batches per evaluation")
    checkpoint_every: int | None = Field(None, ge=1)


class DeepSpeedSpec(_Section):
    stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False


class DistributedSpec(_Section):
    num_workers: int = Field(1, ge=1)
    use_gpu: Union[bool, Literal["auto"]] = "auto"
    cpus_per_worker: int = Field(1, ge=1)
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()
    max_failures: int = Field(0, ge=-1)


class TrackingSpec(_Section):
    uri: str = "sqlite:///mlflow.db"
    experiment: str | None = None


class RegistrySpec(_Section):
    name: str | None = None
    # adapter: LoRA weights + a reference to the base (small); merged: base + adapter merged into
    # one plain transformers model (no peft needed to load it); both: NAME and NAME-merged.
    mode: Literal["adapter", "merged", "both"] = "adapter"
    alias: str = "candidate"


class StorageSpec(_Section):
    # Where Ray Train persists checkpoints and results; relative paths are relative to the
    # working directory of the driver. A URI (s3://bucket/prefix, gs://...) is used as is.
    path: str = "runs"
    # True when `path` is a filesystem mounted at the same place on every node (NFS, EFS, a
    # shared PVC). Once a job's workers span nodes, a local path must be shared: each worker
    # writes its checkpoint where it runs and the driver reads it back on the head node.
    shared: bool = False


class SchedulerSpec(_Section):
    # asha: stop trials whose metric trails the others' at each rung; none: run every trial out.
    type: Literal["asha", "none"] = "asha"
    # Counted in evaluations (one every training.eval_every steps): a trial is first judged after
    # grace_period evaluations, then at grace_period x reduction_factor^k.
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1.0)


class DomainSpec(_Section):
    """One searched value: exactly one of `choice` (a list), `uniform`, `loguniform` or `randint`
    (`[low, high]`, both ends included)."""

    choice: list[Any] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @property
    def kind(self) -> str | None:
        set_ = [k for k in ("choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        return set_[0] if len(set_) == 1 else None


class TuneSpec(_Section):
    """A hyperparameter search over the job: each trial is the job with the `space` values set."""

    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"
    num_samples: int = Field(8, ge=1)
    # Trials running at once; each takes distributed.num_workers x cpus_per_worker CPUs (or GPUs).
    max_concurrent_trials: int | None = Field(None, ge=1)
    scheduler: SchedulerSpec = SchedulerSpec()
    search_alg: Literal["optuna", "random"] = "optuna"
    time_budget_s: float | None = Field(None, gt=0)
    seed: int | None = 0
    space: dict[str, DomainSpec] = Field(default_factory=dict)


class JobSpec(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    model: ModelSpec = ModelSpec()
    quantization: QuantizationSpec = QuantizationSpec()
    peft: PeftSpec = PeftSpec()
    data: DataSpec
    training: TrainingSpec = TrainingSpec()
    distributed: DistributedSpec = DistributedSpec()
    tracking: TrackingSpec = TrackingSpec()
    registry: RegistrySpec = RegistrySpec()
    storage: StorageSpec = StorageSpec()
    tune: TuneSpec | None = None

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
