"""Loading a job spec: YAML + `--set` overrides -> raw dict -> `JobSpec`, with every problem
(pydantic's errors translated to spec paths, and the cross-field checks) reported at once."""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator.spec.checks import is_jinja, is_uri, resolve_path, semantic_problems
from orchestrator.spec.models import JobSpec
from orchestrator.spec.problems import Problem, SpecError


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
        d.train = d.train if is_uri(d.train) else str(resolve_path(d.train, base_dir))
        if isinstance(d.eval, str) and not is_uri(d.eval):
            d.eval = str(resolve_path(d.eval, base_dir))
        if d.chat_template is not None and not is_jinja(d.chat_template):
            # The template itself goes into the spec: an adapter's saved spec renders prompts as
            # training did wherever it is loaded, without the file.
            d.chat_template = resolve_path(d.chat_template, base_dir).read_text(encoding="utf-8")
        if spec.registry.promote is not None and spec.registry.promote.data:
            spec.registry.promote.data = str(resolve_path(spec.registry.promote.data, base_dir))
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
