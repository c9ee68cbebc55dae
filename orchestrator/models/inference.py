"""Load a trained adapter with its base (or a merged model) and complete prompts with it (greedy
decoding); read what was saved beside it (job spec, lineage)."""

from __future__ import annotations

import contextlib
import json
import weakref
from dataclasses import dataclass
from pathlib import Path

import yaml

from orchestrator.spec import SPEC_FILE, JobSpec

# Where the adapter was trained from: base reference, revision and the sha256 of its weights.
LINEAGE_FILE = "lineage.json"
ADAPTER_CONFIG = "adapter_config.json"


class BaseMismatch(Exception):
    """The base found at load time is not the one the adapter was trained on."""


@dataclass
class Loaded:
    model: object
    tokenizer: object
    spec: JobSpec


def read_spec(model_dir: Path) -> JobSpec:
    """The job spec saved beside an adapter or merged model."""
    spec_file = model_dir / SPEC_FILE
    if not spec_file.is_file():
        raise FileNotFoundError(f"{model_dir} holds no {SPEC_FILE}: not an adapter this tool saved")
    return JobSpec.model_validate(yaml.safe_load(spec_file.read_text(encoding="utf-8")))


def read_lineage(model_dir: str | Path) -> dict:
    path = Path(model_dir) / LINEAGE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def is_merged(model_dir: str | Path) -> bool:
    """A saved job without adapter files (or a freeze job's trained tensors) is a merged model
    (a plain transformers model)."""
    model_dir = Path(model_dir)
    return not (model_dir / ADAPTER_CONFIG).is_file() and (model_dir / "config.json").is_file()


def check_base(model_dir: Path, spec: JobSpec, base_path: str) -> None:
    """Raise `BaseMismatch` when the base's weights no longer hash to what the adapter recorded."""
    from orchestrator.models.loading import base_sha256

    expected = read_lineage(model_dir).get("base_sha256")
    if not expected:
        return  # saved before hashes were recorded, or the base was not available to hash
    found = base_sha256(spec.model, base_path)
    if found is not None and found != expected:
        raise BaseMismatch(
            f"the base model {spec.model.base} (at {base_path}) has changed since this adapter was trained: "
            f"its weights hash to sha256 {found[:16]}..., the adapter was trained on {expected[:16]}... "
            f"Fix: load it on the original base (model.base {spec.model.base}, revision "
            f"{spec.model.revision or 'default'}), or use a merged version of the model, which needs no base.")


def load_adapter(adapter_dir: str | Path, with_adapter: bool = True, quantize: bool = True) -> Loaded:
    """The base named by the adapter's saved job spec, quantized as it was trained (or, with
    `quantize=False`, in its compute dtype), plus the adapter; or, with `with_adapter=False`, the
    bare base for comparison. A merged model directory loads as it is, without peft. On a CUDA GPU
    when this machine has one (`loading.inference_device`), else on the CPU.

    Raises `BaseMismatch` when the base's weights differ from the ones the adapter was trained on."""
    from orchestrator.models.adapters import load_trained_model
    from orchestrator.models.loading import load_base_for_inference, load_tokenizer, resolve_base

    adapter_dir = Path(adapter_dir)
    spec = read_spec(adapter_dir)
    if with_adapter and spec.peft.method != "full" and is_merged(adapter_dir):
        model = load_base_for_inference(spec, str(adapter_dir), quantize=False)
        model.eval()
        return Loaded(model=model, tokenizer=load_tokenizer(str(adapter_dir)), spec=spec)
    base_path = resolve_base(spec.model)
    if with_adapter:
        if spec.peft.method != "full":
            check_base(adapter_dir, spec, base_path)
        model = load_trained_model(adapter_dir, spec, base_path, quantize=quantize)
    else:
        model = load_base_for_inference(spec, base_path, quantize=quantize)
        model.eval()
    tokenizer = load_tokenizer(base_path, spec.model.trust_remote_code, spec.model.revision, spec.data.chat_template)
    return Loaded(model=model, tokenizer=tokenizer, spec=spec)


def input_device(model):
    """Where a model's inputs go: the device of its input embeddings (GPU 0 of a model spread
    over several GPUs, whose hooks move the hidden states from layer to layer)."""
    return model.get_input_embeddings().weight.device


def format_prompt(loaded: Loaded, prompt: str) -> str:
    """Wrap a bare prompt the way the adapter's training data was formatted."""
    fmt = loaded.spec.data.format
    if fmt == "alpaca":
        from orchestrator.data.formats import format_alpaca_prompt

        instruction, _, input_text = prompt.partition("\n")
        return format_alpaca_prompt(instruction, input_text)
    if fmt == "chat":
        return loaded.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                    tokenize=False, add_generation_prompt=True)
    return prompt


@dataclass(frozen=True)
class Decoding:
    """How a completion is decoded: greedily (the default, what `generate`, `evaluate` and the
    pyfunc do), or with `temperature` > 0 sampled from the model's distribution at that
    temperature, within the `top_p` nucleus (no top-k cut), from `seed` when one is given; the
    answer ends before the first of the `stop` strings it contains (generation stops there)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def samples(self) -> bool:
        return self.temperature > 0

    def generate_kwargs(self, tokenizer) -> dict:
        """`model.generate`'s decoding arguments."""
        kwargs = ({"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}
                  if self.samples else {"do_sample": False})
        if self.stop:
            kwargs.update(stop_strings=list(self.stop), tokenizer=tokenizer)
        return kwargs

    def seed_rng(self) -> None:
        """Seed torch's RNG for a sampled completion with a seed (the same seed, the same answer)."""
        if self.samples and self.seed is not None:
            import torch

            torch.manual_seed(self.seed)

    def cut(self, text: str) -> str:
        """`text` up to the first of the stop strings in it (all of it when there is none)."""
        ends = [i for stop in self.stop if (i := text.find(stop)) >= 0]
        return text[:min(ends)] if ends else text

    def until_stop(self, pieces):
        """The pieces of a streamed text up to the first stop string, joining to `cut` of the
        whole text: the end of each piece that could begin a stop string is held back until the
        next piece shows whether it does."""
        if not self.stop:
            yield from pieces
            return
        keep, pending = max(map(len, self.stop)) - 1, ""
        for piece in pieces:
            pending += piece
            if (cut := self.cut(pending)) != pending:
                yield cut
                return
            if len(pending) > keep:
                yield pending[:len(pending) - keep]
                pending = pending[len(pending) - keep:]
        yield pending


GREEDY = Decoding()


def complete(loaded: Loaded, prompt: str, max_new_tokens: int = 64) -> str:
    """Greedy completion of `prompt` (formatted as in training); the prompt is not repeated."""
    return complete_formatted(loaded, format_prompt(loaded, prompt), max_new_tokens)


# The registered pyfunc's `predict` params (tracking/pyfunc_model.py) and their defaults, as its
# MLflow signature declares them.
PREDICT_PARAMS = {"max_new_tokens": 64, "batch_size": 8}


def complete_formatted(loaded: Loaded, text: str, max_new_tokens: int = 64, decoding: Decoding = GREEDY) -> str:
    """Greedy completion of `text` (or as `decoding` says), already formatted as the model was
    trained (a rendered chat conversation, an Alpaca prompt): `complete_batch` of one text.
    `complete`, `orchestrator evaluate`, `serve` and the pyfunc all end in `complete_batch`."""
    return complete_batch(loaded, [text], max_new_tokens, decoding=decoding)[0]


def complete_batch(loaded: Loaded, texts: list[str], max_new_tokens: int = 64, batch_size: int = 8,
                   decoding: Decoding = GREEDY, adapters: list[str] | None = None) -> list[str]:
    """Greedy completions of `texts` (formatted as the model was trained; or decoded as `decoding`
    says), in their order, up to `batch_size` at a time: each cut at its first EOS (and before a
    stop string), the prompt not repeated.

    The prompts of a batch are padded on the left with an attention mask, so every one ends where
    generation starts and no padding is attended to; the texts are batched in order of length, so a
    batch pads little. The same completions as one at a time, up to the last float bits of the
    padded positions' arithmetic. A prompt or prefix tuning adapter shares a batch only with
    prompts of its own length (`_padding_shifts_positions`).

    `adapters`: each text's LoRA adapter in `loaded.model` (a peft model holding several), for a
    batch of texts to different adapters (peft's mixed-adapter batches: each row runs through its
    own adapter's weights)."""
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    tok = loaded.tokenizer
    ids = [prompt_ids(tok, t) for t in texts]
    same_length_only = _padding_shifts_positions(loaded.model)
    batches: list[list[int]] = []
    for i in sorted(range(len(ids)), key=lambda i: len(ids[i])):
        if batches and len(batches[-1]) < batch_size and not (
                same_length_only and len(ids[batches[-1][0]]) != len(ids[i])):
            batches[-1].append(i)
        else:
            batches.append([i])
    device = input_device(loaded.model)
    completions: list[str] = [""] * len(texts)
    decoding.seed_rng()
    for chunk in batches:
        # padding_side here, not on the tokenizer: it is shared (serve) and pads on the right in training.
        enc = tok.pad({"input_ids": [ids[i] for i in chunk]}, padding=True, padding_side="left", return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        with torch.no_grad():
            out = _generate(loaded, enc, max_new_tokens, decoding,
                            **({"adapter_names": [adapters[i] for i in chunk]} if adapters else {}))
        for i, row in zip(chunk, out[:, enc["input_ids"].shape[1]:].tolist()):
            if tok.eos_token_id in row:  # a finished prompt waits for the batch's others, padded
                row = row[:row.index(tok.eos_token_id)]
            completions[i] = decoding.cut(tok.decode(row, skip_special_tokens=True)).strip()
    return completions


def _generate(loaded: Loaded, enc: dict, max_new_tokens: int, decoding: Decoding, **extra):
    """`model.generate` on encoded prompts as every completion here runs it: decoded as `decoding`
    says, padded and ended with the tokenizer's own tokens; `extra`: a streamer, stopping criteria."""
    tok = loaded.tokenizer
    return loaded.model.generate(**enc, max_new_tokens=max_new_tokens, **decoding.generate_kwargs(tok),
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **extra)


def prompt_ids(tok, text: str) -> list[int]:
    """A formatted prompt's token ids. A chat template that writes the BOS token itself: no second
    one (as in training)."""
    return tok(text, add_special_tokens=not (tok.bos_token and text.startswith(tok.bos_token)))["input_ids"]


def stream_batch(loaded: Loaded, texts: list[str], max_new_tokens: int = 64, guard=None,
                 decoding: Decoding = GREEDY, cancels: list | None = None, adapters: list[str] | None = None) -> list:
    """The answers of `texts` generated as one batch, each in pieces as the model writes it: one
    generator per text, whose pieces join to exactly that text's answer in `complete_batch(loaded,
    texts, max_new_tokens, batch_size=len(texts), decoding=decoding, adapters=adapters)` (the same
    tokens, decoded as they come, up to a stop string; whitespace at either end held back, as those
    answers are stripped). The prompts are padded on the left and ordered by length as there (the
    generators stay in the texts' order); a prompt or prefix tuning adapter's batch takes prompts
    of one length only (of several: a ValueError from every generator).

    Generation runs in a thread of its own, inside `guard` (a context manager; `serve` holds its
    adapter lock there, so no other request switches the adapter mid-answer), from now. A text's
    generation stops at the next token once its generator is closed or collected, or once its
    `cancels[i]` (a threading.Event) is set: a reader that went away costs the others nothing more,
    and the batch, with its guard, ends when every text's generation has (the last reader to stop
    waits for that). An error in generation is raised from every generator once the pieces before
    it are out."""
    import threading

    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer
    from transformers.generation.streamers import BaseStreamer

    tok = loaded.tokenizer
    ids = [prompt_ids(tok, t) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))  # row r generates text order[r]
    enc = tok.pad({"input_ids": [ids[i] for i in order]}, padding=True, padding_side="left", return_tensors="pt")
    enc = {k: v.to(input_device(loaded.model)) for k, v in enc.items()}
    cancels = list(cancels) if cancels is not None else [threading.Event() for _ in texts]
    # Each text's own streamer (TextIteratorStreamer's decoding and queue, one row's tokens each).
    rows = [TextIteratorStreamer(tok, skip_prompt=False, skip_special_tokens=True) for _ in texts]
    ends = {tok.eos_token_id, tok.pad_token_id} - {None}  # a finished row is padded after its EOS
    failed: list[BaseException] = []

    class Rows(BaseStreamer):
        """generate's tokens, one per row at each step, sent to the rows' streamers until each row ends."""

        def __init__(self):
            self.prompt, self.open = True, [True] * len(rows)

        def put(self, value):
            if self.prompt:  # generate's first call: the prompts
                self.prompt = False
                return
            for i, token in zip(order, value.reshape(-1).tolist()):
                if self.open[i] and (token in ends or cancels[i].is_set()):
                    self.open[i] = False
                    rows[i].end()
                elif self.open[i]:
                    rows[i].put(torch.tensor([token]))

        def end(self):
            for i, row in enumerate(rows):
                if self.open[i]:
                    self.open[i] = False
                    row.end()

    class UntilTheReadersGo(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.tensor([cancels[i].is_set() for i in order], dtype=torch.bool, device=input_ids.device)

    streamer = Rows()

    def generate() -> None:
        try:
            with guard if guard is not None else contextlib.nullcontext(), torch.no_grad():
                # Under the guard: the adapter it sets is the one whose padding matters.
                if len({len(i) for i in ids}) > 1 and _padding_shifts_positions(loaded.model):
                    raise ValueError("a prompt or prefix tuning adapter generates prompts of one length at a "
                                     f"time: these have {sorted({len(i) for i in ids})} tokens")
                decoding.seed_rng()
                _generate(loaded, enc, max_new_tokens, decoding, streamer=streamer,
                          stopping_criteria=StoppingCriteriaList([UntilTheReadersGo()]),
                          **({"adapter_names": [adapters[i] for i in order]} if adapters else {}))
        except BaseException as e:  # noqa: BLE001  raised in the readers' threads, below
            failed.append(e)
        finally:
            streamer.end()  # every reader stops waiting

    thread = threading.Thread(target=generate, daemon=True, name="stream-generate")
    thread.start()

    def pieces(i: int):
        started, held = False, ""
        try:
            for piece in decoding.until_stop(rows[i]):
                if not started:
                    piece = piece.lstrip()
                    started = bool(piece)
                body = (held + piece).rstrip()
                if body:
                    yield body
                held = (held + piece)[len(body):]
        finally:  # the answer is out, or the reader left: this row stops at its next token
            cancels[i].set()
            # The last reader: the batch and its guard end now (never joined from itself, were a
            # reader collected in the generation thread).
            if all(c.is_set() for c in cancels) and threading.current_thread() is not thread:
                thread.join()
        if failed:
            raise failed[0]

    readers = [pieces(i) for i in range(len(texts))]
    for reader, cancel in zip(readers, cancels):
        weakref.finalize(reader, cancel.set)  # a generator never read (or dropped) stops its row
    return readers


def _padding_shifts_positions(model) -> bool:
    """Whether left padding would move a prompt's tokens to other positions: peft's prompt learning
    methods (prompt and prefix tuning) drop the position ids that generate derives from the
    attention mask ("Position ids are not supported for parameter efficient tuning"), so a padded
    prompt would be read as if its padding were text before it."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))
