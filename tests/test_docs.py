"""The documentation stays true to the code: the generated job file reference matches the spec's
models, every page is reachable from the README, no relative link is broken, and the CLI page
names every command and option. Fast and pure: no Ray, torch or MLflow."""

import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from orchestrator.spec.reference import job_file_reference
from orchestrator.spec import JobSpec

from conftest import REPO
DOCS = REPO / "docs"
README = REPO / "README.md"
# Every Markdown page whose links are checked.
PAGES = [README, REPO / "infra" / "README.md", *sorted(DOCS.glob("*.md"))]


def test_job_file_page_is_generated_from_the_spec():
    committed = (DOCS / "job-file.md").read_text(encoding="utf-8")
    assert committed == job_file_reference(), (
        "docs/job-file.md is not what orchestrator/spec/reference.py generates from the spec's models: "
        "run `make docs` and commit docs/job-file.md")


def test_generating_the_page_imports_no_heavy_library():
    # `make docs` must stay instant and work without a GPU stack.
    code = ("import sys, orchestrator.spec.reference as r; r.job_file_reference(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'mlflow', 'transformers'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_the_shuffle_window_the_job_file_page_names_is_the_workers():
    """The spec and the Data section say how many examples a run that trains while its data is
    tokenized waits for: one shuffle window, a constant of the training code (kept out of the
    spec's imports, which stay light), so its figure is checked here."""
    from orchestrator.spec.models import DataSpec
    from orchestrator.training.steps import SHUFFLE_WINDOW

    window = f"{SHUFFLE_WINDOW:,}"
    assert f"({window} examples)" in DataSpec.model_fields["train_while_tokenizing"].description
    assert f"the first {window} training examples (one window of\nthe shuffle)" in job_file_reference()


def _model_of(annotation) -> type[BaseModel] | None:
    """The section model inside `Section`, `Section | None` or `dict[str, Section]`."""
    candidates = [annotation, *typing.get_args(annotation)]
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of the job file; the values of tune.space are under `tune.space.PATH`."""
    keys = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        keys.append(path)
        child = _model_of(info.annotation)
        if child is not None:
            is_mapping = typing.get_origin(info.annotation) is dict
            keys += _all_keys(child, f"{path}.PATH." if is_mapping else f"{path}.")
    return keys


def test_every_section_and_field_is_in_the_job_file_page():
    page = (DOCS / "job-file.md").read_text(encoding="utf-8")
    keys = _all_keys(JobSpec)
    assert {"model.base", "distributed.deepspeed.stage", "tune.scheduler.type", "tune.space.PATH.choice"} <= set(keys)
    missing = [k for k in keys if f"`{k}`" not in page]
    assert not missing, f"not in docs/job-file.md (run `make docs`): {missing}"
    sections = [name for name, info in JobSpec.model_fields.items() if _model_of(info.annotation) is not None]
    for section in sections:
        assert f"### `{section}`" in page, f"no table for the section {section}"
    for field in JobSpec.model_fields.values():
        assert field.description, "every top-level field of JobSpec has a description"


def _strip_code(text: str) -> str:
    """Markdown without fenced blocks and inline code: links inside code are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _links(page: Path) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", _strip_code(page.read_text(encoding="utf-8")))


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors, seen = set(), {}
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    for heading in re.findall(r"^#+\s+(.*?)\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / link.split("#")[0]).resolve() for link in _links(README)}
    unlinked = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link to: {unlinked}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for link in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{link}: no heading with that anchor in {path.name}")
    assert not broken, f"broken links in {page.relative_to(REPO)}: {broken}"


def test_readme_is_a_front_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 200, "README.md is the front page; move details into docs/"
    assert "make demo" in text and "make test" in text


def test_help_shows_each_commands_summary_as_one_paragraph():
    """`orchestrator --help` lists each command with its docstring's first paragraph, which spans
    several source lines; on a terminal wide enough it must read as one line, not broken where the
    source lines break (rich markup mode kept those breaks: ragged, half-empty lines)."""
    import typer

    from orchestrator.cli import app

    root = typer.main.get_command(app)
    env = {**os.environ, "TERMINAL_WIDTH": "400", "PYTHONPATH": str(REPO)}
    for path, group in ([], root), *(([name], sub) for name, sub in root.commands.items() if hasattr(sub, "commands")):
        shown = subprocess.run([sys.executable, "-m", "orchestrator", *path, "--help"], env=env, cwd=REPO,
                               capture_output=True, text=True, check=True).stdout
        lines = [" ".join(line.strip("│ ").split()) for line in shown.splitlines()]
        for name, command in group.commands.items():
            summary = " ".join((command.help or "").split("\n\n")[0].split())
            words = re.sub(r"`", "", summary)
            assert any(line.startswith(f"{name} {words}") for line in lines), \
                f"`orchestrator {' '.join(path + [name])}`'s summary is not one line in --help: {summary!r}"


def test_cli_page_names_every_command_and_option():
    import typer

    from orchestrator.cli import app

    page = (DOCS / "cli.md").read_text(encoding="utf-8")
    missing = []

    # Duck-typed: typer may ship its own copy of click, so isinstance checks against click's
    # classes would silently match nothing.
    def walk(command, path: list[str]) -> None:
        if hasattr(command, "commands"):  # a group
            for name, sub in command.commands.items():
                walk(sub, path + [name])
            return
        if f"`orchestrator {' '.join(path)}" not in page:
            missing.append(" ".join(path))
        for param in command.params:
            names = [*param.opts, *getattr(param, "secondary_opts", [])]
            if param.param_type_name == "option" and "--help" not in names and not any(
                    re.search(rf"{re.escape(n)}\b", page) for n in names):
                missing.append(f"{' '.join(path)} {names[0]}")

    root = typer.main.get_command(app)
    assert len(root.commands) >= 10
    walk(root, [])
    assert not missing, f"docs/cli.md does not mention: {missing}"
