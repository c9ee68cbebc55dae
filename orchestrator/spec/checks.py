"""Cross-field and filesystem checks of a `JobSpec` that a single field's type cannot express."""

from __future__ import annotations

from pathlib import Path

from orchestrator.spec.models import (BASE_TRAINING_METHODS, MERGEABLE_METHODS, METHOD_FIELDS, TARGET_MODULE_PRESETS,
                                      JobSpec, PeftSpec)
from orchestrator.spec.problems import Problem


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
    if spec.model.attn_implementation == "flash_attention_2":
        if spec.distributed.use_gpu is False:
            problems.append(Problem(path="model.attn_implementation", message="flash_attention_2 runs on GPUs only "
                                    "and distributed.use_gpu is false", fix="set model.attn_implementation=auto"))
        if spec.model.dtype == "float32":
            problems.append(Problem(path="model.attn_implementation", message="flash_attention_2 computes in "
                                    "16-bit only and model.dtype is float32",
                                    fix="set model.dtype=bfloat16 or model.attn_implementation=auto"))
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
    if d.packing and spec.peft.method in ("prompt_tuning", "prefix_tuning", "adaption_prompt"):
        problems.append(Problem(path="data.packing",
                                message=f"peft.method {spec.peft.method} adds virtual tokens to every row, which "
                                        "packed examples cannot share",
                                fix="set data.packing=false, or use lora, ia3, freeze or full"))
    if isinstance(d.eval, float) and not 0.0 < d.eval < 1.0:
        problems.append(Problem(path="data.eval", message=f"eval fraction {d.eval} is not between 0 and 1",
                                fix="use e.g. 0.1, or a path to an eval file"))
    if t.checkpoint_every is not None and t.max_steps is not None and t.checkpoint_every > t.max_steps:
        problems.append(Problem(path="training.checkpoint_every",
                                message=f"{t.checkpoint_every} is beyond max_steps ({t.max_steps})",
                                fix="lower it or leave it unset (the final adapter is always saved)"))
    if spec.tune is not None:
        problems += tune_problems(spec)
        if spec.tune.metric == "eval_loss" and d.eval is None:
            problems.append(Problem(path="data.eval", message="the search ranks its trials by eval loss "
                                    "(tune.metric) and data.eval is null: no trial would have one",
                                    fix="set data.eval to an eval file or a fraction of train (e.g. 0.1), "
                                        "or tune.metric=train_loss"))
    promote = spec.registry.promote
    if promote is not None and promote.data is None and d.eval is None:
        problems.append(Problem(path="registry.promote.data", message="the promotion gate evaluates on the job's "
                                "eval data, and data.eval is null",
                                fix="set registry.promote.data to a held-out JSONL file, or set data.eval"))
    if base_dir is not None:
        for field in ("train", "eval"):
            value = getattr(d, field)
            if isinstance(value, str) and not data_source_exists(value, base_dir):
                problems.append(Problem(path=f"data.{field}",
                                        message=f"file not found: {value} (looked in {resolve_path(value, base_dir)})",
                                        fix="point it at an existing JSONL or Parquet file, a directory or glob of "
                                            "them, or an s3:// / gs:// URI (paths are relative to the job file)"))
        template = d.chat_template
        if template is not None and not is_jinja(template) and not resolve_path(template, base_dir).is_file():
            problems.append(Problem(path="data.chat_template",
                                    message=f"file not found: {template} (looked in {resolve_path(template, base_dir)})",
                                    fix="point it at a Jinja template file (relative to the job file), or write "
                                        "the template itself"))
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


def is_jinja(template: str) -> bool:
    """Whether `data.chat_template` is a template itself rather than the path of a file holding one."""
    return "{{" in template or "{%" in template


def is_uri(value: str) -> bool:
    """A location with a scheme (s3://bucket/key, gs://..., file://...): read where it is (Ray Data,
    pyarrow's filesystems), never resolved against the job file's directory or copied."""
    return "://" in value


def is_glob(value: str) -> bool:
    """A data path with a wildcard (`data/*.jsonl`, `shards/**/*.parquet`)."""
    return any(c in value for c in "*?[")


def data_source_exists(value: str, base_dir: Path) -> bool:
    """Whether `data.train` / `data.eval` names something to read: a URI (read where it is, by Ray
    Data, checked when the data is prepared), a file, a directory, or a glob that matches a file."""
    import glob

    if is_uri(value):
        return True
    path = resolve_path(value, base_dir)
    return path.exists() or (is_glob(value) and bool(glob.glob(str(path), recursive=True)))


def resolve_path(value: str, base_dir: Path) -> Path:
    """Paths in a job file are relative to the file's own directory."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base_dir / p).resolve()
