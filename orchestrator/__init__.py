"""Parameter-efficient fine-tuning orchestrator for Ray clusters."""

__version__ = "0.1.0"
