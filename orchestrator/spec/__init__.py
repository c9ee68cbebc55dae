"""The job spec: its sections (`models`), problems (`problems`), loading (`loading`), checks
(`checks`) and the generated job file reference (`reference`, docs/job-file.md). Pure: imports
nothing of the orchestrator above it, and nothing heavier than pydantic and PyYAML."""

from orchestrator.spec.checks import TUNE_METRICS, peft_problems, resolve_path, semantic_problems, tune_problems
from orchestrator.spec.loading import apply_overrides, flatten, load_spec, parse_spec
from orchestrator.spec.models import (BASE_TRAINING_METHODS, DATA_FORMATS, DEFAULT_ADAPTER_LEN, DEFAULT_VIRTUAL_TOKENS,
                                      MERGEABLE_METHODS, METHOD_FIELDS, PEFT_METHODS, SPEC_FILE, TARGET_MODULE_PRESETS,
                                      DataSpec, DeepSpeedSpec, DistributedSpec, DomainSpec, JobSpec, ModelSpec,
                                      PeftSpec, QuantizationSpec, RegistrySpec, SchedulerSpec, StorageSpec,
                                      TrackingSpec, TrainingSpec, TuneSpec, redact_uri)
from orchestrator.spec.problems import Problem, SpecError

__all__ = [
    "BASE_TRAINING_METHODS", "DATA_FORMATS", "DEFAULT_ADAPTER_LEN", "DEFAULT_VIRTUAL_TOKENS", "MERGEABLE_METHODS",
    "METHOD_FIELDS", "PEFT_METHODS", "SPEC_FILE", "TARGET_MODULE_PRESETS", "TUNE_METRICS", "DataSpec", "DeepSpeedSpec",
    "DistributedSpec", "DomainSpec", "JobSpec", "ModelSpec", "PeftSpec", "Problem", "QuantizationSpec", "RegistrySpec",
    "SchedulerSpec", "SpecError", "StorageSpec", "TrackingSpec", "TrainingSpec", "TuneSpec", "apply_overrides",
    "flatten", "load_spec", "parse_spec", "peft_problems", "redact_uri", "resolve_path", "semantic_problems",
    "tune_problems",
]
