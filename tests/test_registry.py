"""Registry workflows on one real run (4-bit base, ZeRO-2, registry.mode=both): merged vs adapter
versions, sizes, base hash check, aliases, export, and pyfunc loading in a fresh process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.spec import load_spec

REPO = Path(__file__).resolve().parents[1]

PROMPT = "Fill in the fact card for the animal.\nA brown owl at the river."
NAME = "reg"


@pytest.fixture(scope="module")
def registered(tmp_path_factory, ray_local, tiny_base):
    """One short QLoRA run registered as both NAME (adapter) and NAME-merged, both downloaded."""
    from orchestrator.tracking.registry import download_model
    from orchestrator.training.recipe import run_job

    tmp = tmp_path_factory.mktemp("registry")
    sets = {"name": NAME, "registry.name": NAME, "registry.mode": "both", "tracking.uri": f"sqlite:///{tmp}/mlflow.db",
            "storage.path": str(tmp / "runs"), "training.max_steps": 6, "training.eval_every": 6}
    spec = load_spec(REPO / "jobs" / "quickstart.yaml", [f"{k}={v}" for k, v in sets.items()])
    summary = run_job(spec)
    uri = summary.tracking_uri
    adapter = download_model(f"models:/{NAME}@candidate", tmp / "adapter", uri)
    merged = download_model(f"models:/{NAME}-merged@candidate", tmp / "merged", uri)
    return {"summary": summary, "uri": uri, "tmp": tmp, "adapter": adapter, "merged": merged}


def cli(*args):
    from orchestrator.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def logits(loaded, text="A brown owl at the river. Animal: owl"):
    import torch

    enc = loaded.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return loaded.model(**enc).logits.float()


def test_both_mode_registers_linked_versions(registered):
    reg = registered["summary"].registered_model
    assert reg["mode"] == "adapter" and reg["linked"] == f"models:/{NAME}-merged/1"
    shown = json.loads(cli("registry", "show", f"{NAME}-merged@candidate", "--tracking-uri", registered["uri"],
                           "--json"))
    assert shown["mode"] == "merged" and shown["tags"]["adapter_version"] == f"models:/{NAME}/1"
    assert shown["run_id"] == registered["summary"].run_id and shown["job_spec"].startswith("name: reg")


def test_merged_model_equals_dequantized_base_plus_adapter(registered):
    """The merged bf16 model against the 4-bit-trained adapter on the base loaded in bf16: the same
    logits within bf16 rounding, and the same greedy completion. peft is not needed to load it."""
    from transformers import AutoModelForCausalLM

    from orchestrator.models.inference import complete, load_adapter

    merged = load_adapter(registered["merged"])
    assert type(merged.model) is type(AutoModelForCausalLM.from_pretrained(registered["merged"]))
    assert not any("lora" in n for n, _ in merged.model.named_parameters())
    with_adapter = load_adapter(registered["adapter"], quantize=False)
    bare = load_adapter(registered["adapter"], with_adapter=False, quantize=False)
    a, b, base = logits(merged), logits(with_adapter), logits(bare)
    diff, effect = (a - b).abs().max().item(), (b - base).abs().max().item()
    print(f"max |merged - (base + adapter)| = {diff:.4f}; adapter's own effect {effect:.4f}")
    # bf16 keeps 8 bits of mantissa: ~0.4% relative error per rounding, on logits of size ~10.
    assert diff < 0.1, diff
    assert effect > 2 * diff, (effect, diff)  # the comparison is not vacuous
    assert complete(merged, PROMPT, 24) == complete(with_adapter, PROMPT, 24)


def test_adapter_version_is_a_fraction_of_the_merged_one(registered):
    from orchestrator.tracking.registry import describe_version, dir_size

    uri = registered["uri"]
    adapter, merged = describe_version(uri, f"{NAME}@candidate"), describe_version(uri, f"{NAME}-merged@candidate")
    assert adapter["size_bytes"] == dir_size(registered["adapter"])
    print(f"adapter {adapter['size_bytes']} B, merged {merged['size_bytes']} B")
    assert adapter["size_bytes"] < 0.1 * merged["size_bytes"]
    assert "model.safetensors" not in {p.name for p in registered["adapter"].iterdir()}


def test_lineage_records_base_and_data_hashes(registered, tiny_base):
    from orchestrator.data.files import file_sha256
    from orchestrator.models.loading import base_sha256
    from orchestrator.spec import ModelSpec

    shown = json.loads(cli("registry", "show", f"{NAME}@candidate", "--tracking-uri", registered["uri"], "--json"))
    assert shown["tags"]["base_sha256"] == base_sha256(ModelSpec(), str(tiny_base))
    train = yaml.safe_load(shown["job_spec"])["data"]["train"]
    assert shown["run_tags"]["data.train_sha256"] == file_sha256(train)
    assert shown["tags"]["spec_hash"] == shown["run_tags"]["spec_hash"]
    assert "eval_loss" in shown["metrics"]


def test_adapter_on_a_changed_base_fails_clearly(registered, tiny_base, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from orchestrator.models.inference import BaseMismatch, load_adapter

    base = shutil.copytree(tiny_base, tmp_path / "base")
    weights = load_file(base / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + torch.ones_like(weights[name]) * 1e-2
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    adapter = shutil.copytree(registered["adapter"], tmp_path / "adapter")
    spec = yaml.safe_load((adapter / "job.yaml").read_text())
    spec["model"]["base"] = str(base)
    (adapter / "job.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(BaseMismatch, match=r"has changed since this adapter was trained: its weights hash to "
                                           r"sha256 \w+\.\.\., the adapter was trained on \w+\.\.\. Fix:"):
        load_adapter(adapter)


def test_aliases_move_and_resolve(registered):
    from mlflow import MlflowClient

    uri, run_id = registered["uri"], registered["summary"].run_id
    cli("register", run_id, "--mode", "adapter", "--tracking-uri", uri)  # version 2, no retraining
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert str(client.get_model_version_by_alias(NAME, "candidate").version) == "2"
    for version in ("1", "2"):
        cli("registry", "promote", NAME, version, "--alias", "production", "--tracking-uri", uri)
        assert str(client.get_model_version_by_alias(NAME, "production").version) == version
    listed = json.loads(cli("registry", "list", "--tracking-uri", uri, "--json"))
    assert {m["name"]: m["aliases"] for m in listed}[NAME] == {"candidate": "2", "production": "2"}


def test_export_hf_and_adapter(registered, tmp_path):
    from transformers import AutoModelForCausalLM

    uri = registered["uri"]
    cli("registry", "export", f"{NAME}@candidate", str(tmp_path / "hf"), "--format", "hf", "--tracking-uri", uri)
    cli("registry", "export", f"{NAME}@candidate", str(tmp_path / "ad"), "--format", "adapter", "--tracking-uri", uri)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert (tmp_path / "ad" / "adapter_config.json").is_file()


def test_pyfunc_loads_and_predicts_in_a_fresh_process(registered):
    from orchestrator.models.inference import complete, load_adapter

    code = (
        "import json, sys, mlflow\n"
        f"mlflow.set_registry_uri({registered['uri']!r})\n"
        "out = {}\n"
        f"for uri in ('models:/{NAME}@candidate', 'models:/{NAME}-merged@candidate'):\n"
        "    model = mlflow.pyfunc.load_model(uri)\n"
        f"    out[uri] = model.predict([{PROMPT!r}, 'A red fox.'], params={{'max_new_tokens': 16}})\n"
        "print(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    adapter, merged = out[f"models:/{NAME}@candidate"], out[f"models:/{NAME}-merged@candidate"]
    assert len(adapter) == len(merged) == 2 and all(isinstance(t, str) for t in adapter + merged)
    assert merged[0] == complete(load_adapter(registered["merged"]), PROMPT, 16)
