"""Session-wide fixtures: one built tiny model and one Ray instance for the whole test run."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    """The built-in demo base, built (deterministically) once and cached like `make demo` does."""
    from orchestrator.models.builtin import resolve_builtin

    return Path(resolve_builtin("builtin:tiny-llama"))


@pytest.fixture(scope="session")
def tokenizer(tiny_base):
    from orchestrator.models.loading import load_tokenizer

    return load_tokenizer(str(tiny_base))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (2 CPUs) shared by every test that trains; stopped at the end.
    With the dashboard's state API, which a search needs to free the workers of stopped trials."""
    from orchestrator.training import launch

    launch.connect(None, dashboard=True)
    yield
    launch.shutdown()
