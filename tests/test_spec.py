"""Spec validation: a table of bad specs, each with the message a user must see."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from orchestrator.spec import SpecError, apply_overrides, flatten, load_spec, parse_spec

from conftest import REPO


def write_job(tmp_path: Path, body: dict) -> Path:
    (tmp_path / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def base_job(**sections) -> dict:
    job = {"name": "t", "data": {"train": "train.jsonl"}, "training": {"max_steps": 5}}
    for key, value in sections.items():
        job[key] = {**job.get(key, {}), **value} if isinstance(value, dict) else value
    return job


BAD = [
    # (sections, expected substring of the one problem line)
    ({"name": "has space"}, "name: String should match pattern"),
    ({"model": {"dtyp": "bfloat16"}}, "model.dtyp: unknown key. Fix: did you mean 'dtype'?"),
    ({"quantization": {"bits": 3}}, "quantization.bits: Input should be 4 or 8 (got 3)"),
    ({"quantization": {"quant_type": "int4"}}, "quantization.quant_type: Input should be 'nf4' or 'fp4'"),
    ({"peft": {"r": 0}}, "peft.r: Input should be greater than or equal to 1 (got 0)"),
    ({"peft": {"method": "qlora"}}, "peft.method: Input should be 'lora'"),
    ({"peft": {"target_modules": "attn"}}, "peft.target_modules: unknown preset 'attn'. Fix: use one of attention, mlp, all-linear"),
    ({"peft": {"target_modules": []}}, "peft.target_modules: empty list"),
    ({"data": {"train": "missing.jsonl"}}, "data.train: file not found: missing.jsonl"),
    ({"data": {"format": "csv"}}, "data.format: Input should be 'alpaca', 'chat' or 'text' (got 'csv')"),
    ({"data": {"eval": 1.5}}, "data.eval: eval fraction 1.5 is not between 0 and 1"),
    ({"training": {"max_steps": None}}, "training.max_steps: neither max_steps nor epochs is set"),
    ({"training": {"epochs": 1}}, "training.epochs: both max_steps and epochs are set"),
    ({"training": {"learning_rate": -1}}, "training.learning_rate: Input should be greater than 0 (got -1)"),
    ({"training": {"lr_scheduler": "cos"}}, "training.lr_scheduler: Input should be 'cosine', 'linear' or 'constant'"),
    ({"training": {"checkpoint_every": 50}}, "training.checkpoint_every: 50 is beyond max_steps (5)"),
    ({"distributed": {"num_workers": 0}}, "distributed.num_workers: Input should be greater than or equal to 1"),
    ({"distributed": {"use_gpu": "maybe"}}, "distributed.use_gpu: Input should be a valid boolean"),
    ({"distributed": {"deepspeed": {"stage": 4}}}, "distributed.deepspeed.stage: Input should be 0, 1, 2 or 3 (got 4)"),
    ({"distributed": {"deepspeed": {"stage": 2, "offload_params": True}}},
     "distributed.deepspeed.offload_params: parameter offload needs ZeRO stage 3"),
    ({"distributed": {"deepspeed": {"stage": 0, "offload_optimizer": True}}},
     "distributed.deepspeed.offload_optimizer: optimizer offload needs ZeRO stage 1, 2 or 3"),
    ({"model": {"dtype": "float32"}, "distributed": {"deepspeed": {"stage": 3}}},
     "model.dtype: ZeRO-3 with a quantized base needs a 16-bit dtype"),
    ({"registry": {"mode": "fused"}}, "registry.mode: Input should be 'adapter', 'merged' or 'both'"),
    ({"tracking": {"url": "x"}}, "tracking.url: unknown key. Fix: did you mean 'uri'?"),
    # PEFT methods: each method's own fields, and the combinations that cannot work
    ({"peft": {"method": "ia3", "use_dora": True}},
     "peft.use_dora: only peft.method lora reads it, this job is ia3. Fix: remove peft.use_dora, or set peft.method=lora"),
    ({"peft": {"method": "lora", "num_virtual_tokens": 8}},
     "peft.num_virtual_tokens: only peft.method prompt_tuning or prefix_tuning reads it"),
    ({"peft": {"method": "prefix_tuning", "init_text": "Hi"}}, "peft.init_text: only peft.method prompt_tuning reads it"),
    ({"peft": {"method": "lora", "last_n_layers": 1}}, "peft.last_n_layers: only peft.method freeze reads it"),
    ({"peft": {"method": "prompt_tuning", "adapter_len": 4}}, "peft.adapter_len: only peft.method adaption_prompt"),
    ({"peft": {"method": "freeze", "last_n_layers": 1}},
     "quantization.bits: freeze trains the base's own weights, which cannot be trained 4-bit quantized. "
     "Fix: set quantization.bits=null"),
    ({"peft": {"method": "full"}, "quantization": {"bits": 8}},
     "quantization.bits: full fine-tuning trains the base's own weights, which cannot be trained 8-bit"),
    ({"peft": {"method": "freeze"}, "quantization": {"bits": None}},
     "peft.trainable_patterns: freeze needs something to train. Fix: set peft.trainable_patterns"),
    ({"peft": {"method": "freeze", "trainable_patterns": ["layers.(2"]}, "quantization": {"bits": None}},
     "peft.trainable_patterns.0: not a regular expression"),
    ({"peft": {"method": "prompt_tuning"}, "registry": {"mode": "merged"}},
     "registry.mode: 'merged': prompt_tuning adapters cannot be merged into the base weights. "
     "Fix: set registry.mode=adapter, or use one of lora, ia3, freeze"),
    ({"peft": {"method": "adaption_prompt"}, "registry": {"mode": "both"}}, "registry.mode: 'both': adaption_prompt adapters cannot"),
    ({"peft": {"method": "full"}, "quantization": {"bits": None}, "registry": {"mode": "merged"}},
     "registry.mode: 'merged': full fine-tuning has no adapter to merge"),
    ({"peft": {"num_virtual_tokens": 0, "method": "prompt_tuning"}},
     "peft.num_virtual_tokens: Input should be greater than or equal to 1"),
    ({"trainig": {"max_steps": 3}}, "trainig: unknown key. Fix: did you mean 'training'?"),
    ({"data": {"eval": None}, "tune": {"space": {"peft.r": {"choice": [4, 8]}}}},
     "data.eval: the search ranks its trials by eval loss (tune.metric) and data.eval is null"),
    ({"data": {"eval": None}, "registry": {"promote": {"alias": "production"}}},
     "registry.promote.data: the promotion gate evaluates on the job's eval data, and data.eval is null"),
]


@pytest.mark.parametrize("sections,expected", BAD, ids=[b[1].split(":")[0] for b in BAD])
def test_bad_spec_names_field_problem_and_fix(tmp_path, sections, expected):
    with pytest.raises(SpecError) as exc:
        load_spec(write_job(tmp_path, base_job(**sections)))
    lines = [str(p) for p in exc.value.problems]
    assert len(lines) == 1, lines
    assert expected in lines[0]
    assert "Fix:" in lines[0]


def test_all_problems_are_reported_at_once(tmp_path):
    job = base_job(quantization={"bits": 3}, peft={"r": 0, "target_modules": "attn"},
                   data={"train": "nope.jsonl"}, distributed={"deepspeed": {"stage": 2, "offload_params": True}})
    with pytest.raises(SpecError) as exc:
        load_spec(write_job(tmp_path, job))
    paths = [p.path for p in exc.value.problems]
    assert paths == ["quantization.bits", "peft.r", "distributed.deepspeed.offload_params",
                     "peft.target_modules", "data.train"]


def test_valid_spec_defaults_and_paths_relative_to_job_file(tmp_path):
    spec = load_spec(write_job(tmp_path, base_job()))
    assert spec.data.train == str(tmp_path / "train.jsonl")
    assert spec.quantization.bits == 4 and spec.distributed.deepspeed.stage == 2
    assert spec.tracking.uri == "sqlite:///mlflow.db"
    assert spec.experiment == "t" and spec.registered_name == "t"


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    path = write_job(tmp_path, base_job())
    spec = load_spec(path, ["training.learning_rate=1e-3", "distributed.deepspeed.stage=3", "peft.target_modules=[q_proj, v_proj]"])
    assert spec.training.learning_rate == 1e-3
    assert spec.distributed.deepspeed.stage == 3
    assert spec.peft.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(SpecError) as exc:
        load_spec(path, ["training.learnig_rate=1", "peft.r=-2"])
    assert [p.path for p in exc.value.problems] == ["peft.r", "training.learnig_rate"]
    assert apply_overrides({}, ["nodots"])[0].message == "not of the form dotted.path=value"


def test_spec_hash_is_stable_and_sensitive(tmp_path):
    a = load_spec(write_job(tmp_path, base_job()))
    b = load_spec(write_job(tmp_path, base_job()))
    c = load_spec(write_job(tmp_path, base_job(peft={"r": 16})))
    assert a.spec_hash() == b.spec_hash() != c.spec_hash()
    # Credentials are not part of the job; where the server is, is.
    uri = lambda u: load_spec(write_job(tmp_path, base_job(tracking={"uri": u}))).spec_hash()  # noqa: E731
    assert uri("http://127.0.0.1:5000") == uri("http://me:secret@127.0.0.1:5000") == uri("http://me:other@127.0.0.1:5000")
    assert uri("http://127.0.0.1:5000") != uri("http://127.0.0.1:5001")
    assert flatten({"a": {"b": 1}, "c": 2}) == {"a.b": 1, "c": 2}


def test_malformed_yaml_and_non_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="malformed YAML at line"):
        load_spec(bad)
    with pytest.raises(SpecError, match="not a mapping"):
        parse_spec(["a", "list"])


def test_every_shipped_job_file_validates():
    jobs = sorted((REPO / "jobs").glob("*.yaml"))
    assert jobs, "no job files shipped"
    for job in jobs:
        load_spec(job)


def test_cli_validate_lists_every_problem_exit_2_no_traceback(tmp_path):
    job = write_job(tmp_path, base_job(peft={"r": 0}, training={"lr_scheduler": "cos"}, model={"dtyp": "x"}))
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(job)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    for field in ("model.dtyp: unknown key", "peft.r:", "training.lr_scheduler:"):
        assert field in proc.stderr
    ok = subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(REPO / "jobs" / "quickstart.yaml")],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr


def test_a_password_in_the_tracking_uri_never_reaches_logged_spec_data():
    from orchestrator.spec import flatten, parse_spec

    spec = parse_spec({"name": "secret", "data": {"train": "t.jsonl"}, "training": {"max_steps": 1},
                       "tracking": {"uri": "http://alice:s3cr3t-pw@mlflow.internal:5000"}})
    assert spec.tracking.uri == "http://alice:s3cr3t-pw@mlflow.internal:5000"  # the run itself still uses it
    logged = spec.to_yaml() + repr(flatten(spec.public_dict()))
    assert "s3cr3t-pw" not in logged and "alice" not in logged
    assert "http://mlflow.internal:5000" in logged
