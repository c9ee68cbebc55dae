"""Built-in demo base models that are built locally instead of downloaded.

``builtin:tiny-llama`` is a ~0.8M-parameter Llama (standard HF module names:
``q_proj``/``k_proj``/``v_proj``/``o_proj``/``gate_proj``/``up_proj``/``down_proj``)
with its own byte-level BPE tokenizer, pre-trained for about a minute and a half on one CPU
core on a deterministic synthetic English corpus about a small closed world
(animals, their sounds/homes/sizes/legs, coloured objects, places, numbers, people)
plus generic instruction/response examples in the Alpaca prompt format of
:mod:`orchestrator.data.formats` (the corpus: :mod:`orchestrator.models.corpus`; the recipes:
:mod:`orchestrator.planning.catalogue`).  It exists so that the whole pipeline
(data loading, (Q)LoRA training, evaluation, merging, serving) can be demonstrated
and tested end to end without network access or a GPU.

Usage::

    path = resolve_builtin("builtin:tiny-llama")   # builds on first call (~1.5 min), cached
    AutoModelForCausalLM.from_pretrained(path); AutoTokenizer.from_pretrained(path)

The build is deterministic: byte-identical ``tokenizer.json`` and ``model.safetensors`` for
the same recipe and library versions on any x86-64 CPU with AVX2. It runs in a child process
whose numerics are pinned (:data:`PINNED_NUMERICS`): one thread, torch's AVX2 kernels instead of
the ones for the CPU's own instruction set, and MKL's conditional numerical reproducibility mode
for AVX2. Without them a CPU with AVX-512 and one with AVX2 build different weights (torch picks
its vectorised kernels and MKL its matrix-multiply code path by the CPU), and so every result
downstream of the base differs by machine. The model is cached under
``$XDG_CACHE_HOME/orchestrator/builtin`` (default ``~/.cache/orchestrator/builtin``)
in a directory whose name carries a hash of the recipe, built into a temporary
directory and atomically renamed into place under an ``fcntl.flock`` lock, so
concurrent callers (e.g. several Ray workers on one node) build it only once.

Heavy imports (torch, transformers, tokenizers) are done lazily so that
importing this module is cheap (:func:`~orchestrator.planning.catalogue.is_builtin`
needs none of them).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.models.corpus import (ASSISTANT_TOKEN, BOS_TOKEN, CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN,
                                        SPECIAL_TOKENS, SYSTEM_TOKEN, USER_TOKEN, TinyWorldCorpus)
from orchestrator.planning.catalogue import BUILTIN_PREFIX, BuiltinModelSpec, _lookup, default_cache_dir

# Written last into a finished model directory.
BUILD_INFO_FILE = "builtin_build_info.json"

# The environment of the build's child process on an x86-64 CPU with AVX2 (every x86 server CPU
# since 2013): read by torch (ATEN_CPU_CAPABILITY, at its first vectorised kernel) and MKL (MKL_CBWR,
# at its first call) when they start, so they cannot be set in a process that already ran either.
# torch's AVX2 kernels and MKL's reproducible AVX2 code path give the same bytes on every such CPU;
# measured on an AVX-512 CPU, the build takes about 1.35x as long as with the CPU's own (torch's
# portable kernels and MKL's SSE2 path, for any x86-64 CPU, took 3.1x).
PINNED_NUMERICS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_PROGRESS = "builtin-build-progress"


def resolve_builtin(
    base: str,
    cache_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Return the local directory of built-in model ``base`` (e.g. ``"builtin:tiny-llama"``).

    Builds it on the first call (about a minute and a half on one CPU core) and caches it; later
    calls return immediately.  Safe to call concurrently from several processes.
    ``progress(step, total)`` is called during pre-training if given.
    Raises ``ValueError`` for an unknown name.
    """
    return _resolve_spec(_lookup(base), cache_dir=cache_dir, progress=progress)


def is_built(base: str, cache_dir: Path | None = None) -> bool:
    """Whether built-in model ``base`` is in the cache: `resolve_builtin` returns it at once."""
    return _is_complete(_cache_path(_lookup(base), cache_dir))


def _cache_path(spec: BuiltinModelSpec, cache_dir: Path | None) -> Path:
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / spec.dir_name()


def _is_complete(path: Path) -> bool:
    return (path / BUILD_INFO_FILE).is_file()


def _resolve_spec(
    spec: BuiltinModelSpec,
    cache_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    final = _cache_path(spec, cache_dir)
    cache_dir = final.parent
    if _is_complete(final):
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    lock_path = cache_dir / f".{spec.dir_name()}.lock"
    with open(lock_path, "a+") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            if _is_complete(final):  # somebody else built it while we waited
                return final
            if final.exists():  # incomplete leftover (should not happen: we rename atomically)
                shutil.rmtree(final, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{spec.dir_name()}.tmp-", dir=cache_dir))
            try:
                _build(spec, tmp, progress=progress)
                # mkdtemp creates 0700; make the shared cache readable like a normal download.
                for f in tmp.iterdir():
                    os.chmod(f, 0o644)
                os.chmod(tmp, 0o755)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return final
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------


def build_tokenizer(spec: BuiltinModelSpec):
    """Train the byte-level BPE and wrap it as a ``PreTrainedTokenizerFast`` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.tokenizer_vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Train on plain text (documents never contain the special-token strings except
    # the chat ones, which are removed so they are not split into merges).
    docs = []
    for d in TinyWorldCorpus(spec.seed).documents(spec.tokenizer_docs):
        for s in SPECIAL_TOKENS:
            d = d.replace(s, "\n")
        docs.append(d)
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[USER_TOKEN, ASSISTANT_TOKEN, SYSTEM_TOKEN],
        chat_template=CHAT_TEMPLATE,
        model_max_length=spec.model_config.get("max_position_embeddings", 512),
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def _pretraining_rows(spec: BuiltinModelSpec, tokenizer) -> Any:
    """Pack ``<|bos|> doc <|eos|>`` token streams into ``[steps * batch, seq_len]`` rows."""
    import torch

    needed = spec.steps * spec.batch_size * spec.seq_len
    ids: list[int] = []
    gen = TinyWorldCorpus(spec.seed + 1).documents()
    eos = tokenizer.eos_token_id
    while len(ids) < needed:
        batch = [next(gen) for _ in range(512)]
        # add_special_tokens=True prepends <|bos|> via the post-processor.
        for row in tokenizer(batch, add_special_tokens=True)["input_ids"]:
            ids.extend(row)
            ids.append(eos)
    return torch.tensor(ids[:needed], dtype=torch.long).view(spec.steps * spec.batch_size, spec.seq_len)


def _build(
    spec: BuiltinModelSpec,
    out_dir: Path,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Build tokenizer + pre-trained model of ``spec`` into ``out_dir``, deterministically: in a
    child process with :data:`PINNED_NUMERICS`, relaying its ``progress(step, total)``."""
    recipe = json.dumps(dataclasses.asdict(spec))
    package_root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, **_numerics(), "PYTHONPATH": path}
    with tempfile.TemporaryFile("w+") as err:
        with subprocess.Popen([sys.executable, "-m", __name__, recipe, str(out_dir)], env=env,
                              stdout=subprocess.PIPE, stderr=err, text=True) as child:
            for line in child.stdout:
                word, *numbers = line.split() or [""]
                if word == _PROGRESS and progress is not None:
                    progress(*map(int, numbers))
        if child.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"building the built-in model {spec.name!r} failed (exit code "
                               f"{child.returncode}): {err.read().strip()[-3000:]}")


def _numerics() -> dict[str, str]:
    """:data:`PINNED_NUMERICS` on a CPU with AVX2; elsewhere (no AVX2, or not x86) one thread only:
    such a CPU builds its own weights, the same on every run."""
    try:
        avx2 = " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        avx2 = False
    if avx2:
        return dict(PINNED_NUMERICS)
    return {k: v for k, v in PINNED_NUMERICS.items() if k.endswith("_NUM_THREADS")}


def _build_here(
    spec: BuiltinModelSpec,
    out_dir: Path,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Build tokenizer + pre-trained model of ``spec`` into ``out_dir`` in this process (the
    child of :func:`_build`: deterministic only with its pinned numerics)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    t0 = time.time()
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(spec)
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)

    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            rows = _pretraining_rows(spec, tokenizer)
            config = LlamaConfig(
                vocab_size=len(tokenizer),
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **spec.model_config,
            )
            model = LlamaForCausalLM(config)
            model.to(torch.float32)
            model.train()
            decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
            no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
            opt = torch.optim.AdamW(
                [
                    {"params": decay, "weight_decay": spec.weight_decay},
                    {"params": no_decay, "weight_decay": 0.0},
                ],
                lr=spec.lr,
                betas=(0.9, 0.95),
                eps=1e-8,
            )

            def lr_at(step: int) -> float:
                if step < spec.warmup_steps:
                    return spec.lr * (step + 1) / spec.warmup_steps
                t = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
                cos = 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
                return spec.lr * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * cos)

            losses = []
            for step in range(spec.steps):
                for g in opt.param_groups:
                    g["lr"] = lr_at(step)
                batch = rows[step * spec.batch_size : (step + 1) * spec.batch_size]
                loss = model(input_ids=batch, labels=batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                if progress is not None:
                    progress(step + 1, spec.steps)
            model.eval()
            model.generation_config = GenerationConfig(
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            model.save_pretrained(out_dir, safe_serialization=True)
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.set_num_threads(old_threads)

    info = {
        "name": spec.name,
        "builtin": BUILTIN_PREFIX + spec.name,
        "recipe_hash": spec.recipe_hash(),
        "recipe": spec.recipe(),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "final_train_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "build_seconds": round(time.time() - t0, 2),
        "torch_version": torch.__version__,
        "numerics": {**{k: os.environ.get(k) for k in PINNED_NUMERICS},
                     "cpu_capability": torch.backends.cpu.get_cpu_capability()},
    }
    # Written last: its presence marks a complete build.
    (out_dir / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":  # the child process of _build: python -m orchestrator.models.builtin RECIPE OUT_DIR
    def _report(step: int, total: int) -> None:
        print(_PROGRESS, step, total, flush=True)

    _build_here(BuiltinModelSpec(**json.loads(sys.argv[1])), Path(sys.argv[2]), progress=_report)
