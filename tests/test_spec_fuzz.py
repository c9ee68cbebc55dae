"""Property: whatever YAML a user writes, the spec loader returns a valid spec or a clean
`SpecError` (one line per problem, each naming a path), never another exception."""

import string

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.spec import JobSpec, SpecError, load_spec

KEYS = ["name", "model", "base", "dtype", "quantization", "bits", "peft", "r", "alpha", "method",
        "target_modules", "data", "train", "eval", "format", "max_seq_len", "training", "max_steps",
        "epochs", "learning_rate", "distributed", "num_workers", "deepspeed", "stage", "offload_params",
        "tracking", "uri", "registry", "mode", "alias", "storage", "path", "bogus"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True),
                    st.text(string.printable, max_size=12), st.sampled_from(["lora", "nf4", "bfloat16", "all-linear"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)), max_leaves=12)
documents = st.one_of(values, st.dictionaries(st.sampled_from(KEYS), values, max_size=8))


def check(tmp_path, text: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        spec = load_spec(path)
    except SpecError as e:
        assert e.problems
        for p in e.problems:
            line = str(p)
            assert "\n" not in line and p.path and p.message, line
        return
    assert isinstance(spec, JobSpec)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(documents)
def test_arbitrary_yaml_documents(tmp_path, doc):
    check(tmp_path, yaml.safe_dump(doc))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(string.printable, max_size=80))
def test_arbitrary_text(tmp_path, text):
    check(tmp_path, text)
