"""Registry workflows on the session's quickstart run (conftest.py: 4-bit base, ZeRO-2,
registry.mode=both): merged vs adapter versions, sizes, base hash check, aliases, export, where
inference places a model, batched completion, and pyfunc loading in a fresh process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import QUICKSTART_RUN, REPO

PROMPT = "Fill in the fact card for the animal.\nA brown owl at the river."
NAME = QUICKSTART_RUN


@pytest.fixture(scope="module")
def registered(tmp_path_factory, quickstart_run):
    """The session's QLoRA run (conftest.py), registered as both NAME (adapter) and NAME-merged,
    both versions downloaded."""
    from orchestrator.tracking.registry import download_model

    _, summary = quickstart_run
    tmp = tmp_path_factory.mktemp("registry")
    uri = summary.tracking_uri
    adapter = download_model(f"models:/{NAME}/1", tmp / "adapter", uri)
    merged = download_model(f"models:/{NAME}-merged/1", tmp / "merged", uri)
    return {"summary": summary, "uri": uri, "adapter": adapter, "merged": merged}


def cli(*args):
    from orchestrator.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def test_both_mode_registers_linked_versions(registered):
    reg = registered["summary"].registered_model
    assert reg["mode"] == "adapter" and reg["linked"] == f"models:/{NAME}-merged/1"
    shown = json.loads(cli("registry", "show", f"{NAME}-merged@candidate", "--tracking-uri", registered["uri"],
                           "--json"))
    assert shown["mode"] == "merged" and shown["tags"]["adapter_version"] == f"models:/{NAME}/1"
    assert shown["run_id"] == registered["summary"].run_id and shown["job_spec"].startswith(f"name: {NAME}")


# bf16 keeps 8 significant bits: rounding to the nearest bf16 value moves x by at most this much of
# |x| (half a unit in the last place, torch.finfo(torch.bfloat16).eps / 2 = 2**-8).
BF16_ROUNDING = 2.0**-8


def exact_merged_weights(adapter_dir: Path, base_dir: Path) -> dict:
    """base + (alpha / r) * B @ A for every LoRA pair, in float32, from the files alone (neither peft
    nor the product's merge): the weights a perfect merge would hold before rounding."""
    import torch
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert not config["use_dora"] and not config["use_rslora"] and not config.get("fan_in_fan_out")
    scaling = config["lora_alpha"] / config["r"]
    weights = {k: v.float() for k, v in load_file(base_dir / "model.safetensors").items()}
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    pairs = [k for k in adapter if k.endswith("lora_A.weight")]
    assert pairs
    for a_key in pairs:
        target = a_key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        b = adapter[a_key.replace("lora_A", "lora_B")].float()
        weights[target] = weights[target] + scaling * (b @ adapter[a_key].float())
    return weights


def test_merged_weights_are_base_plus_adapter_rounded_once(registered, tiny_base):
    """Every weight of the merged bf16 model is the bf16 value nearest to base + adapter: the sum is
    taken in float32 and rounded once. (Merging a float32 base loaded as bf16 rounds twice and put
    about one weight in ten further off than this.)"""
    import torch
    from transformers import AutoModelForCausalLM

    exact = exact_merged_weights(registered["adapter"], tiny_base)
    merged = AutoModelForCausalLM.from_pretrained(registered["merged"], dtype=torch.float32).state_dict()
    assert {k for k in merged if k != "lm_head.weight"} <= set(exact)
    for name, x in exact.items():
        worst = ((merged[name] - x).abs() - BF16_ROUNDING * x.abs()).max().item()
        assert worst <= 0, f"{name}: a merged weight is further than half a bf16 unit from base + adapter"


def test_merged_model_computes_base_plus_adapter(registered):
    """The merged model against what it stands for, base + adapter (the 4-bit-trained adapter on the
    base's own float32 weights), both run in float32: the only difference left is the rounding of
    the merged weights to bf16. Its effect on the logits is bounded by the dtype, and greedy
    decoding agrees wherever the top two logits are further apart than twice that bound (closer
    ones may swap; comparing whole completions would compare such ties). peft is not needed to
    load the merged model."""
    import torch
    from transformers import AutoModelForCausalLM

    from orchestrator.models.adapters import load_trained_model
    from orchestrator.models.inference import format_prompt, load_adapter, read_spec
    from orchestrator.models.loading import load_base, resolve_base

    merged = load_adapter(registered["merged"])
    assert type(merged.model) is type(AutoModelForCausalLM.from_pretrained(registered["merged"]))
    assert not any("lora" in n for n, _ in merged.model.named_parameters())
    spec = read_spec(registered["adapter"])
    spec.model.dtype = "float32"
    base_path = resolve_base(spec.model)
    reference = load_trained_model(registered["adapter"], spec, base_path, quantize=False)
    bare = load_base(spec, base_path, quantize=False).eval()
    merged32 = AutoModelForCausalLM.from_pretrained(registered["merged"], dtype=torch.float32).eval()

    tok = merged.tokenizer
    text = format_prompt(merged, "Give a description of this animal.\nThere is a brown wolf at the river.")
    ids = tok(text + "It is a wolf. It is big. It has four legs.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b, base = (m(input_ids=ids).logits[0] for m in (merged32, reference, bare))
    # Each weight moves by at most 2**-8 of itself; through the layers that moves a logit by about
    # eps x the logits' scale (measured: 0.7% of the largest logit). Four times that is the bound.
    bound = 4 * torch.finfo(torch.bfloat16).eps * b.abs().max().item()
    diff, effect = (a - b).abs().max().item(), (b - base).abs().max().item()
    print(f"max |merged - (base + adapter)| = {diff:.4f} (bound {bound:.4f}); the adapter's own effect {effect:.4f}")
    assert diff <= bound, (diff, bound)
    # Not vacuous: a merge that dropped the adapter, or added it twice, would be off by its effect.
    assert effect > 2 * bound, (effect, bound)

    prompt = tok(format_prompt(merged, PROMPT), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = reference.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24,
                                 do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        # Both models read the reference's greedy completion; the logits before each of its tokens.
        start = prompt.shape[1] - 1
        want, got = (m(input_ids=out).logits[0, start:-1] for m in (reference, merged32))
    top2 = want.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) > 2 * bound
    assert decisive.sum() >= len(decisive) / 2, "too few tokens decided by more than the bound to compare"
    assert torch.equal(got.argmax(-1)[decisive], want.argmax(-1)[decisive])


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
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        cli("register", run_id, "--mode", "adapter", "--tracking-uri", uri)  # version 2, no retraining
        assert str(client.get_model_version_by_alias(NAME, "candidate").version) == "2"
        for version in ("1", "2"):
            cli("registry", "promote", NAME, version, "--alias", "production", "--tracking-uri", uri)
            assert str(client.get_model_version_by_alias(NAME, "production").version) == version
        listed = json.loads(cli("registry", "list", "--tracking-uri", uri, "--json"))
        assert {m["name"]: m["aliases"] for m in listed}[NAME] == {"candidate": "2", "production": "2"}
    finally:  # the run is the session's: its aliases as the run left them, for the tests after this one
        client.set_registered_model_alias(NAME, "candidate", "1")
        client.delete_registered_model_alias(NAME, "production")


def test_export_hf_and_adapter(registered, tmp_path):
    from transformers import AutoModelForCausalLM

    uri = registered["uri"]
    cli("registry", "export", f"{NAME}@candidate", str(tmp_path / "hf"), "--format", "hf", "--tracking-uri", uri)
    cli("registry", "export", f"{NAME}@candidate", str(tmp_path / "ad"), "--format", "adapter", "--tracking-uri", uri)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert (tmp_path / "ad" / "adapter_config.json").is_file()


# Prompts of very different lengths (39, 14 and 121 tokens once formatted), in no order of length.
PROMPTS = [PROMPT, "A cat.", "Fill in the fact card for the animal.\n" + "A brown owl at the river. It is small. " * 8]


def test_pyfunc_loads_and_predicts_in_a_fresh_process(registered):
    """The registered pyfunc (each version in a fresh process, as a user loads it) returns one
    completion per prompt, in the prompts' order: with batch_size 1 every prompt is completed alone,
    so its completions equal `generate`'s exactly (the batching sorts the prompts by length and must
    put the answers back); with the default batch size all three share one padded batch."""
    from orchestrator.models.inference import complete, load_adapter

    code = (
        "import json, sys, mlflow\n"
        f"mlflow.set_registry_uri({registered['uri']!r})\n"
        "out = {}\n"
        f"for uri in ('models:/{NAME}@candidate', 'models:/{NAME}-merged@candidate'):\n"
        "    model = mlflow.pyfunc.load_model(uri)\n"
        f"    out[uri] = [model.predict({PROMPTS!r}, params={{'max_new_tokens': 16, 'batch_size': size}})\n"
        "                for size in (1, 8)]\n"
        "print(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for version, model_dir in ((f"models:/{NAME}@candidate", registered["adapter"]),
                               (f"models:/{NAME}-merged@candidate", registered["merged"])):
        alone, batched = out[version]
        assert len(alone) == len(batched) == len(PROMPTS) and all(isinstance(t, str) for t in alone + batched)
        loaded = load_adapter(model_dir)
        assert alone == [complete(loaded, p, 16) for p in PROMPTS], version


def test_merged_and_adapter_versions_are_served_as_generate_answers(registered):
    """`serve`'s versions (ServedAdapters, as each replica holds them): the merged version as a
    model of its own beside the adapter version on its base; each answers, whole and streamed,
    exactly as `generate` answers for it, and counts tokens with its own tokenizer."""
    from orchestrator.cli import app
    from orchestrator.serving.adapters import ServedAdapters

    uri, refs = registered["uri"], [f"models:/{NAME}-merged/1", f"models:/{NAME}/1"]
    served = ServedAdapters(refs, uri)
    assert served.load() == {ref: ref for ref in refs}
    assert list(served.whole) == [f"{NAME}-merged/1"] and len(served.shared) == 1
    for ref in refs:
        result = CliRunner().invoke(app, ["generate", ref, PROMPT, "--max-new-tokens", "16", "--tracking-uri", uri])
        assert result.exit_code == 0, result.output
        want = result.stdout.strip()
        text, prompt_tokens = served.complete(ref, prompt=PROMPT, max_tokens=16)
        stream = served.stream(ref, prompt=PROMPT, max_tokens=16)
        assert text == "".join(stream.pieces) == want and prompt_tokens > 0 and stream.count(text) > 0, ref


def test_adapter_versions_share_a_model_only_on_a_base_loaded_alike():
    """`serve` holds adapter versions of one base in one peft model per `shared_key`: a version
    answers as `generate` answers for it only on the base loaded as its job loads it (a LoRA
    trained on the bf16 base not on the 4-bit one), and peft combines adapters of one type only.
    How the job trained and the adapter's own shape do not matter. (tests/test_peft_methods.py
    serves every method's version from one replica.)"""
    from orchestrator.serving.adapters import shared_key
    from orchestrator.spec import load_spec

    def key(*sets: str) -> tuple:
        return shared_key(load_spec(REPO / "jobs" / "quickstart.yaml", list(sets)))

    qlora = key()
    assert key("training.max_steps=5", "distributed.num_workers=1", "distributed.deepspeed.stage=3", "peft.r=4",
               "peft.use_dora=true", "data.max_seq_len=32") == qlora
    # 4-bit's own settings do not part unquantized (or 8-bit) bases.
    assert key("quantization.bits=null", "quantization.double_quant=false") == key("quantization.bits=null")
    for other in (["quantization.bits=null"], ["quantization.bits=8"], ["quantization.double_quant=false"],
                  ["quantization.quant_type=fp4"], ["model.dtype=float32"], ["model.attn_implementation=eager"],
                  ["peft.method=ia3"], ["peft.method=prompt_tuning"]):
        assert key(*other) != qlora, other


def test_served_requests_gathered_together_share_one_generation(registered):
    """`complete_many`, what a replica runs on the requests Serve gathers: the greedy requests to
    one version run as one left-padded batch (the model's passes see all of them at once) and get
    `complete_batch`'s answers for them; a request to another version, and a sampled one, run on
    their own and answer as alone; a reference not served is that request's KeyError only. The
    answers come back in the requests' order."""
    from orchestrator.models.inference import Decoding, complete_batch, format_prompt
    from orchestrator.serving.adapters import Answer, ServedAdapters

    uri, refs = registered["uri"], [f"models:/{NAME}-merged/1", f"models:/{NAME}/1"]
    served = ServedAdapters(refs, uri)
    served.load()
    merged, adapter = refs
    sampled = Decoding(temperature=1.0, seed=3)
    requests = [dict(ref=adapter, prompt=p, max_tokens=16) for p in PROMPTS]
    requests.insert(1, dict(ref=merged, prompt=PROMPT, max_tokens=16))
    requests.insert(3, dict(ref=adapter, prompt=PROMPT, max_tokens=16, decoding=sampled))
    requests.append(dict(ref="models:/nope/1", prompt=PROMPT, max_tokens=16))
    rows: list[int] = []  # the batch size of each pass of the adapters' model
    embeddings = served.model_of(f"{NAME}/1").get_input_embeddings()
    hook = embeddings.register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    try:
        answers = served.complete_many(requests)
    finally:
        hook.remove()
    assert isinstance(answers[-1], KeyError), answers[-1]
    assert all(isinstance(a, Answer) for a in answers[:-1]), answers
    assert [a.batch_size for a in answers[:-1]] == [len(PROMPTS), 1, len(PROMPTS), 1, len(PROMPTS)]
    assert max(rows) == len(PROMPTS) and rows.count(1) >= 1, rows  # the batch, and the sampled request alone
    greedy = [answers[i] for i in (0, 2, 4)]
    served._activate(served.active[adapter])
    loaded = served._prompt(adapter, PROMPT, None)[1]
    want = complete_batch(loaded, [format_prompt(loaded, p) for p in PROMPTS], 16, batch_size=len(PROMPTS))
    assert [a.text for a in greedy] == want
    assert answers[1].text == served.complete(merged, prompt=PROMPT, max_tokens=16)[0]
    assert answers[3].text == served.complete(adapter, prompt=PROMPT, max_tokens=16, decoding=sampled)[0]
    tokenizer = lambda ref: (served.whole.get(served.active[ref]) or served).tokenizer  # the version's own
    for request, answer in zip(requests, answers[:-1]):
        counted = len(tokenizer(request["ref"])(answer.text, add_special_tokens=False)["input_ids"])
        assert answer.tokens == counted and answer.prompt_tokens > 0


def test_streams_that_arrive_together_generate_as_one_batch(registered):
    """`ServedAdapters.stream`, what a replica runs for each streamed request: streams that arrive
    together (here 3, from 3 threads, max_batch 3) generate as one left-padded batch (the model's
    passes see 3 rows), each told its batch's size, and each one's pieces join to exactly its answer
    in `complete_batch` of the same prompts in one batch. A stream closed after its first piece
    stops there, while the others still answer whole; the lock is free once the last is read."""
    from concurrent.futures import ThreadPoolExecutor

    from orchestrator.models.inference import complete_batch, format_prompt
    from orchestrator.serving.adapters import ServedAdapters

    uri, ref = registered["uri"], f"models:/{NAME}/1"
    # A wide window, closed as soon as the batch is full: the test never depends on how fast threads start.
    served = ServedAdapters([ref], uri, max_batch=len(PROMPTS), batch_wait_s=60.0)
    served.load()
    rows: list[int] = []
    embeddings = served.model_of(f"{NAME}/1").get_input_embeddings()
    hook = embeddings.register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    try:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            streams = list(pool.map(lambda p: served.stream(ref, prompt=p, max_tokens=16), PROMPTS))
        assert [s.batch_size for s in streams] == [len(PROMPTS)] * len(PROMPTS)
        first = next(streams[0].pieces)
        streams[0].pieces.close()  # its reader went away: the others go on
        answers = ["".join(s.pieces) for s in streams[1:]]
    finally:
        hook.remove()
    assert set(rows) == {len(PROMPTS)}, rows
    loaded = served._prompt(ref, PROMPT, None)[1]
    want = complete_batch(loaded, [format_prompt(loaded, p) for p in PROMPTS], 16, batch_size=len(PROMPTS))
    assert answers == want[1:] and all(answers), (answers, want)
    assert want[0].startswith(first) and first, (first, want[0])
    assert not served.lock.locked()


def test_serve_batch_benchmark_stays_runnable(registered):
    """benchmarks/serve_batch.py, smoke-sized (2 requests, 4 tokens, one round): both modes answer
    every request, one at a time in batches of 1, batched in batches of at most 2 (the 2
    non-streamed requests in one). Its timings are not asserted (docs/serving.md has them)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_batch", REPO / "benchmarks" / "serve_batch.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.run(f"models:/{NAME}/1", registered["uri"], requests=2, tokens=4, rounds=1)
    for mode, sizes in (("batched", [2, 2]), ("one_at_a_time", [1, 1])):
        streamed, whole = results[mode]["streamed"][0], results[mode]["not_streamed"][0]
        assert whole["batch_sizes"] == sizes and 1 <= min(streamed["batch_sizes"]) <= max(streamed["batch_sizes"]) <= 2
        assert 0 < streamed["first_piece_median_s"] <= streamed["first_piece_max_s"] <= streamed["wall_s"], streamed
    assert results["one_at_a_time"]["streamed"][0]["batch_sizes"] == [1, 1]


def test_a_stream_closed_early_stops_generating(registered):
    """A streamed completion whose reader goes away (serve: a client that disconnected) stops
    generating at its next token: when `close()` returns, the guard (serve's adapter lock) is free
    again and the model ran fewer forward passes than the whole answer takes; so does one whose
    `cancel` event is set (its pieces then a beginning of the answer). Read to the end, the pieces
    are the whole answer."""
    import threading

    from orchestrator.models.inference import complete_formatted, format_prompt, load_adapter, stream_batch

    loaded = load_adapter(registered["adapter"])
    text, tokens = format_prompt(loaded, PROMPTS[0]), 48
    one_stream = lambda **kwargs: stream_batch(loaded, [text], tokens, **kwargs)[0]  # a batch of one
    passes: list[int] = []
    hook = loaded.model.get_input_embeddings().register_forward_hook(lambda *_: passes.append(1))  # one per pass
    try:
        whole = list(one_stream())
        assert "".join(whole) == complete_formatted(loaded, text, tokens) and len(whole) >= 4, whole
        needed = len(passes)
        passes.clear()
        lock = threading.Lock()
        pieces = one_stream(guard=lock)
        assert next(pieces) == whole[0]
        pieces.close()
        assert not lock.locked() and len(passes) < needed, (len(passes), needed)
        passes.clear()
        cancel = threading.Event()  # as serve sets it when Serve cancels a stream whose client left
        pieces = one_stream(cancels=[cancel])
        first = next(pieces)
        cancel.set()
        rest = list(pieces)
        assert "".join(whole).startswith("".join([first, *rest])) and len(passes) < needed, (rest, len(passes))
    finally:
        hook.remove()


def test_batched_completions_equal_one_at_a_time(registered):
    """`complete_batch` of prompts of very different lengths, left-padded into one batch, against
    each prompt completed alone, on the trained adapter in float32.

    Padding changes the shapes of the matrix products, so the batched logits may differ from the
    single ones in the last float bits, and a greedy step whose top two logits are that close may
    pick either: asserting equal completions outright would pass or fail by luck. So the check is
    in two parts that are guaranteed: (1) the first step's logits agree within TOL = 1e-4, some
    hundred times float32's rounding of logits of this scale (eps 1.2e-7 x |logit| < 10 = 1.2e-6);
    (2) where every step of a prompt's single greedy path was decided by a top-2 margin above
    2 x TOL (each path within TOL of the other cannot swap such a pair), the batched completion
    equals the single one exactly. At least two of the three prompts must be so decided, or the
    check would be vacuous."""
    import torch

    from orchestrator.models.adapters import load_trained_model
    from orchestrator.models.inference import Loaded, complete_batch, complete_formatted, format_prompt, read_spec
    from orchestrator.models.loading import load_tokenizer, resolve_base

    tol, new_tokens = 1e-4, 16
    spec = read_spec(registered["adapter"])
    spec.model.dtype = "float32"
    base_path = resolve_base(spec.model)
    loaded = Loaded(model=load_trained_model(registered["adapter"], spec, base_path, quantize=False),
                    tokenizer=load_tokenizer(base_path), spec=spec)
    model, tok = loaded.model, loaded.tokenizer
    texts = [format_prompt(loaded, p) for p in PROMPTS]
    ids = [tok(t)["input_ids"] for t in texts]
    assert max(map(len, ids)) >= 3 * min(map(len, ids)), [len(i) for i in ids]

    batch = tok.pad({"input_ids": ids}, padding_side="left", return_tensors="pt")
    # As generate does: each row's positions count from its first real token.
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(**batch, position_ids=positions).logits[:, -1]
        alone = torch.stack([model(input_ids=torch.tensor([i])).logits[0, -1] for i in ids])
    print(f"max |batched - alone| first-step logit: {(batched - alone).abs().max().item():.2e} (tol {tol})")
    assert torch.allclose(batched, alone, atol=tol, rtol=0)

    got = complete_batch(loaded, texts, new_tokens, batch_size=len(texts))
    decided = 0
    for text, ids_, completion in zip(texts, ids, got):
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids_]), max_new_tokens=new_tokens, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        top2 = torch.cat(out.logits).topk(2, dim=-1).values
        if ((top2[:, 0] - top2[:, 1]) > 2 * tol).all():
            decided += 1
            assert completion == complete_formatted(loaded, text, new_tokens), text
    assert decided >= 2, f"only {decided} of {len(texts)} prompts decided by margins above {2 * tol}"


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_prompt_learning_batches_only_prompts_of_one_length(method, tiny_base):
    """peft's prompt and prefix tuning drop the position ids generate derives from the padding, so a
    left-padded prompt would be read at shifted positions (measured: other completions, not other
    float bits). `complete_batch` puts such a model's prompts of different lengths in batches of
    their own: the completions equal one-at-a-time ones exactly (the same computation), with a
    batch size that would otherwise hold them all. The adapters are freshly initialised (seeded):
    their virtual tokens are random, which is all the positions need."""
    import peft
    import torch

    from orchestrator.models.inference import Loaded, complete_batch, complete_formatted, format_prompt, stream_batch
    from orchestrator.models.loading import load_base, load_tokenizer
    from orchestrator.spec import load_spec

    spec = load_spec(REPO / "jobs" / "quickstart.yaml", ["model.dtype=float32"])
    config = {"prompt_tuning": peft.PromptTuningConfig, "prefix_tuning": peft.PrefixTuningConfig}[method]
    torch.manual_seed(0)
    model = peft.get_peft_model(load_base(spec, str(tiny_base), quantize=False),
                                config(num_virtual_tokens=4, task_type="CAUSAL_LM")).eval()
    loaded = Loaded(model=model, tokenizer=load_tokenizer(str(tiny_base)), spec=spec)
    texts = [format_prompt(loaded, p) for p in PROMPTS]
    assert complete_batch(loaded, texts, 12, batch_size=8) == [complete_formatted(loaded, t, 12) for t in texts]
    # Streamed as one batch (which `serve` never forms for such an adapter): refused by every reader,
    # checked under the guard, where the adapter that generates is set; a prompt alone streams its answer.
    for reader in stream_batch(loaded, texts, 12):
        with pytest.raises(ValueError, match="one length at a time"):
            list(reader)
    assert "".join(stream_batch(loaded, texts[:1], 12)[0]) == complete_formatted(loaded, texts[0], 12)


@pytest.mark.parametrize("gpus, model_gib, gpu_gib, expected", [
    (0, 1, 80, {"": "cpu"}),          # no GPU: the CPU, whatever the sizes
    (1, None, None, {"": 0}),         # sizes unknown (.bin weights): one GPU
    (1, 60, 80, {"": 0}),             # 60 <= 0.8 x 80 = 64: fits one GPU
    (8, 60, 80, {"": 0}),             # fits one: one GPU, no layer hops between GPUs
    (4, 70, 80, "auto"),              # 70 > 64 but <= 4 x 64: spread over the GPUs
    (2, 140, 80, {"": "cpu"}),        # 140 > 2 x 64: the CPU, never a partial offload
    (1, 70, 80, {"": "cpu"}),         # too big for the one GPU
])
def test_inference_device_map(gpus, model_gib, gpu_gib, expected):
    from orchestrator.models.loading import inference_device_map

    gib = 2**30
    assert inference_device_map(gpus, model_gib and model_gib * gib, gpu_gib and gpu_gib * gib) == expected


def test_loaded_weight_bytes_counts_the_parameters(tiny_base):
    """The size inference places a model by: the base's parameters x 4 bytes in float32, x 2 in
    bf16, x 0.5 quantized to 4 bits; and on this GPU-less machine the device map is the CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    from orchestrator.models.loading import inference_device, loaded_weight_bytes
    from orchestrator.spec import load_spec

    spec = load_spec(REPO / "jobs" / "quickstart.yaml", ["model.dtype=float32"])
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_base).parameters())
    assert loaded_weight_bytes(spec, str(tiny_base), quantize=False) == 4 * params
    spec.model.dtype = "bfloat16"
    assert loaded_weight_bytes(spec, str(tiny_base), quantize=False) == 2 * params
    assert loaded_weight_bytes(spec, str(tiny_base), quantize=True) == params // 2
    if not torch.cuda.is_available():
        assert inference_device(spec, str(tiny_base)) == {"": "cpu"}
