"""The built-in demo base model (builtin:tiny-llama) and the quickstart demo data.

Cache mechanics and build determinism are tested on a shrunken recipe (a few optimizer
steps, built in seconds); the real recipe is the session's (conftest's `tiny_base`: built once in
the default cache, about a minute and a half on one core, while the tests that need no base run).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest

from orchestrator.data.formats import ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT, format_alpaca_prompt
from orchestrator.models import builtin as bm
from orchestrator.models import corpus
from orchestrator.planning import catalogue

from conftest import REPO
TINY = catalogue.BUILTIN_MODELS["tiny-llama"]
# Same architecture and tokenizer recipe, but only a handful of optimizer steps.
SHRUNK = dataclasses.replace(TINY, steps=3, batch_size=2, tokenizer_docs=3000)
LLAMA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _load_data_script():
    spec = importlib.util.spec_from_file_location("make_quickstart_data", REPO / "jobs/data/make_quickstart_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer():
    return bm.build_tokenizer(TINY)


# --- names ---------------------------------------------------------------------------


def test_is_builtin_and_unknown_names():
    assert catalogue.is_builtin("builtin:tiny-llama")
    assert not catalogue.is_builtin("meta-llama/Llama-3.2-1B")
    assert not catalogue.is_builtin("/models/tiny-llama")
    assert "tiny-llama" in catalogue.BUILTIN_MODELS
    with pytest.raises(ValueError, match="builtin:tiny-llama"):
        bm.resolve_builtin("builtin:no-such-model")


def test_recipe_hash_names_the_cache_dir():
    assert TINY.dir_name() == f"tiny-llama-{TINY.recipe_hash()}"
    assert dataclasses.replace(TINY, steps=TINY.steps + 1).recipe_hash() != TINY.recipe_hash()
    assert dataclasses.replace(TINY, seed=TINY.seed + 1).recipe_hash() != TINY.recipe_hash()
    assert dataclasses.replace(TINY, description="other words").recipe_hash() == TINY.recipe_hash()


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert bm.default_cache_dir() == tmp_path / "orchestrator" / "builtin"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert bm.default_cache_dir() == Path.home() / ".cache" / "orchestrator" / "builtin"


# --- corpus and tokenizer ------------------------------------------------------------


def test_corpus_is_deterministic_and_never_shows_the_demo_task():
    a = list(bm.TinyWorldCorpus(7).documents(300))
    assert a == list(bm.TinyWorldCorpus(7).documents(300))
    assert a != list(bm.TinyWorldCorpus(8).documents(300))
    data = _load_data_script()
    instructions = data.TRAIN_INSTRUCTIONS + data.HELD_OUT_INSTRUCTIONS
    descriptions = {data.render_description(animal) for animal in corpus.ANIMALS}
    for doc in bm.TinyWorldCorpus(TINY.seed + 1).documents(5000):
        assert not any(i in doc for i in instructions)
        assert not any(d in doc for d in descriptions)
    # ...but the base is taught the Alpaca format the data loader uses
    assert any(doc.startswith("### Instruction:\n") for doc in a)


def test_tokenizer_is_deterministic(tokenizer):
    again = bm.build_tokenizer(TINY)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert 512 < len(tokenizer) <= TINY.tokenizer_vocab_size


def test_tokenizer_special_tokens_and_roundtrip(tokenizer):
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == [bm.PAD_TOKEN, bm.BOS_TOKEN, bm.EOS_TOKEN]
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == (bm.PAD_TOKEN, bm.BOS_TOKEN, bm.EOS_TOKEN)
    for special in bm.SPECIAL_TOKENS:
        assert len(tokenizer(special, add_special_tokens=False)["input_ids"]) == 1
    texts = [
        "The small dog runs to the park.",
        format_alpaca_prompt("Name a color.") + "blue",
        format_alpaca_prompt("Describe the animal.", "I saw a brown dog at the park."),
        "Unseen words: zebra, 42 ünïcödé 🦙\n\ttabs  and  spaces",
    ]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id  # BOS is added like Llama tokenizers do
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    # common corpus words are single tokens
    assert len(tokenizer(" dog", add_special_tokens=False)["input_ids"]) == 1


def test_tokenizer_offsets_split_prompt_from_response(tokenizer):
    """The data loader masks by character offsets: the response must start on a token boundary."""
    prompt = format_alpaca_prompt("Describe the animal.", "I saw a brown dog at the park.")
    text = prompt + "It is a dog. It is small."
    enc = tokenizer(text, return_offsets_mapping=True)
    starts = [s for s, e in enc["offset_mapping"] if e > s]
    assert len(prompt) in starts


def test_chat_template(tokenizer):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What does a dog say?"},
        {"role": "assistant", "content": "A dog says woof."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|bos|><|system|>\nYou are a helpful assistant.<|eos|>\n"
        "<|user|>\nWhat does a dog say?<|eos|>\n"
        "<|assistant|>\nA dog says woof.<|eos|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|bos|><|user|>\nWhat does a dog say?<|eos|>\n<|assistant|>\n"
    ids = tokenizer.apply_chat_template(messages[1:2], tokenize=True, add_generation_prompt=True, return_dict=True)
    ids = ids["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    with pytest.raises(Exception, match="role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


# --- cache mechanics and determinism (shrunken recipe) -------------------------------


@pytest.fixture(scope="module")
def concurrent_build(tmp_path_factory) -> dict:
    """SHRUNK resolved by 3 threads at once in an empty cache (the real child-process build), with
    each build call and progress update they made."""
    root = tmp_path_factory.mktemp("cache")
    calls, seen_progress, results = [], [], []
    real_build = bm._build

    def counting_build(spec, out_dir, progress=None):
        calls.append(spec.dir_name())
        time.sleep(0.5)  # widen the race window for the concurrent callers below
        return real_build(spec, out_dir, progress=progress)

    def progress(step: int, total: int) -> None:
        seen_progress.append((step, total))

    def call() -> None:
        results.append(bm._resolve_spec(SHRUNK, root, progress))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bm, "_build", counting_build)
        threads = [threading.Thread(target=call) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return {"root": root, "calls": calls, "progress": seen_progress, "results": results}


def test_build_once_then_cached(concurrent_build):
    root, calls, results = concurrent_build["root"], concurrent_build["calls"], concurrent_build["results"]
    assert len(calls) == 1, "concurrent callers must build once"
    assert len(results) == 3 and len(set(results)) == 1
    path = results[0]
    assert path == root / SHRUNK.dir_name()
    assert concurrent_build["progress"][-1] == (SHRUNK.steps, SHRUNK.steps)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", bm.BUILD_INFO_FILE):
        assert (path / name).is_file(), name
    assert "chat_template" in json.loads((path / "tokenizer_config.json").read_text())
    # no temp dirs left behind
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == [SHRUNK.dir_name()]
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]
    t0 = time.time()
    assert bm._resolve_spec(SHRUNK, root) == path
    assert time.time() - t0 < 0.5 and len(calls) == 1


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def broken_build(spec, out_dir, progress=None):
        (Path(out_dir) / "partial").write_text("x")
        raise RuntimeError("boom")

    monkeypatch.setattr(bm, "_build", broken_build)
    with pytest.raises(RuntimeError, match="boom"):
        bm._resolve_spec(SHRUNK, tmp_path)
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]


def test_build_is_byte_identical_on_another_cpu(concurrent_build, tmp_path, monkeypatch):
    """A second build runs as on a CPU with AVX2 and without AVX-512: torch told to use its AVX2
    kernels, MKL its AVX2 code paths. Unpinned (without PINNED_NUMERICS) the two builds' weights
    differ on a CPU with AVX-512 (this machine's); pinned they are byte-identical."""
    a, b = concurrent_build["root"] / SHRUNK.dir_name(), tmp_path / "b"
    b.mkdir()
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    bm._build(SHRUNK, b)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    numerics = json.loads((b / bm.BUILD_INFO_FILE).read_text())["numerics"]
    assert numerics == {**bm.PINNED_NUMERICS, "cpu_capability": "AVX2"} == {**bm._numerics(), "cpu_capability": "AVX2"}


# --- the real recipe -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama_dir(tiny_base) -> Path:
    """The real builtin:tiny-llama in the default cache (the session's, conftest's `tiny_base`)."""
    return tiny_base


def test_real_model_is_the_documented_bytes(tiny_llama_dir):
    """The model this machine built is the one docs/demo.md names: the same bytes as on the machine
    that wrote it there, whatever this CPU's instruction set."""
    import hashlib
    import re

    demo = (REPO / "docs" / "demo.md").read_text()
    documented = re.search(r"`model.safetensors` has the SHA-256\s+`([0-9a-f]{64})`", demo)
    assert documented, "docs/demo.md names no SHA-256 of the built-in model"
    assert hashlib.sha256((tiny_llama_dir / "model.safetensors").read_bytes()).hexdigest() == documented[1]


def test_real_model_loads_and_knows_its_world(tiny_llama_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    assert bm.resolve_builtin("builtin:tiny-llama") == tiny_llama_dir
    assert bm.is_built("builtin:tiny-llama") and not bm.is_built("builtin:tiny-llama", cache_dir=tmp_path)
    assert time.time() - t0 < 0.5
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tok)
    assert not model.config.tie_word_embeddings
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert LLAMA_MODULES <= names
    assert tok.chat_template and tok.eos_token_id == model.generation_config.eos_token_id

    def answer(prompt: str) -> str:
        ids = tok(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
        return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    assert answer(format_alpaca_prompt("What does a dog say?")) == "A dog says woof."
    assert answer(format_alpaca_prompt("Where does a duck live?")) == "A duck lives in the pond."
    # ...but it does not know the demo task's format
    demo = answer(format_alpaca_prompt("Describe the animal.", "I saw a brown dog at the park."))
    assert not demo.startswith("It is a dog. It is small.")


# --- the quickstart data -------------------------------------------------------------


def test_alpaca_templates():
    assert ALPACA_PROMPT_WITH_INPUT.format(instruction="I", input="X") == (
        "### Instruction:\nI\n\n### Input:\nX\n\n### Response:\n")
    assert ALPACA_PROMPT_NO_INPUT.format(instruction="I") == "### Instruction:\nI\n\n### Response:\n"


def test_quickstart_data_is_up_to_date_and_held_out(tokenizer):
    data = _load_data_script()
    assert data.main(["--check"]) == 0, "run: python jobs/data/make_quickstart_data.py"
    rows = {split: [json.loads(line) for line in (REPO / f"jobs/data/quickstart/{split}.jsonl").open()]
            for split in ("train", "eval")}
    assert len(rows["train"]) == data.N_TRAIN and len(rows["eval"]) == data.N_EVAL
    train_prompts = {(r["instruction"], r["input"]) for r in rows["train"]}
    assert not [r for r in rows["eval"] if (r["instruction"], r["input"]) in train_prompts]
    for r in rows["train"] + rows["eval"]:
        assert set(r) == {"instruction", "input", "output"}
        n = len(tokenizer(format_alpaca_prompt(r["instruction"], r["input"]) + r["output"])["input_ids"]) + 1
        assert n < 96
