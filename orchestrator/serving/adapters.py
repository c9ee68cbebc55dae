"""The registered versions a replica serves: one base model with every adapter version loaded into
it (peft multi-adapter), and each merged, full or freeze version as a model of its own. Each
request picks its version by the registered reference it was served as (`models:/NAME@ALIAS`).
`load` re-resolves the references, so a moved alias is served after the next load; a version a
streamed answer was resolved to stays loaded until that stream is done."""

from __future__ import annotations

import collections
import contextlib
import tempfile
import threading
import weakref
from pathlib import Path
from typing import NamedTuple


LORA = "LoRA adapters"  # complete_many's group of the LoRA adapters of the shared base


def model_id(ref: str) -> str:
    """The served name of a reference: always with the `models:/` prefix."""
    return ref if ref.startswith("models:/") else f"models:/{ref}"


class Answer(NamedTuple):
    """One request's completion: its text, its prompt's and its own length in tokens, how many
    requests were gathered into its batch, itself included (`ServedAdapters.complete_many`), and
    the version that answered (models:/NAME/VERSION)."""

    text: str
    prompt_tokens: int
    tokens: int
    batch_size: int
    version: str


class Stream(NamedTuple):
    """One request's streamed completion (`ServedAdapters.stream`): its pieces, its prompt's length
    in tokens, a function counting the answer's tokens, and the version that answers."""

    pieces: object
    prompt_tokens: int
    count: object
    version: str


class ServedAdapters:
    """Versions loaded once each, under the names `NAME/VERSION`: adapters of one base in one peft
    model, whole models (merged, full, freeze) on their own."""

    def __init__(self, refs: list[str], tracking_uri: str):
        self.refs = [model_id(r) for r in refs]
        self.tracking_uri = tracking_uri
        self.model = None
        self.tokenizer = None
        self.base: tuple | None = None        # (model.base, base sha256) every adapter must share
        self.specs: dict[str, object] = {}    # version name -> the job spec it was trained with
        self.whole: dict[str, object] = {}    # version name -> its own model (a models.inference.Loaded)
        self.active: dict[str, str] = {}      # served ref -> version name
        self.lock = threading.Lock()          # set_adapter + generate is one step per request
        # Streams resolve their version when they arrive and generate later: a reload between the
        # two leaves their version loaded ("retired") until the last of them is gone.
        self.in_use: collections.Counter = collections.Counter()  # version name -> streams not gone
        self.retired: set[str] = set()
        self._gone: collections.deque = collections.deque()        # streams gone, counted under the lock

    def load(self) -> dict[str, str]:
        """Resolve every reference (aliases may have moved) and load the versions not loaded yet;
        adapters no reference names any more are unloaded. Returns ref -> models:/NAME/VERSION."""
        from orchestrator.tracking.registry import resolve_version

        wanted = {}
        for ref in self.refs:
            v = resolve_version(self.tracking_uri, ref)
            wanted[ref] = f"{v.name}/{v.version}"
        with self.lock:
            self._settle()
            for name in dict.fromkeys(wanted.values()):
                self.retired.discard(name)
                if name not in self.specs:
                    self._add(name)
            self.active = wanted
            for name in set(self.specs) - set(wanted.values()) - self.retired:
                self._unload(name)
        return {ref: f"models:/{name}" for ref, name in wanted.items()}

    def _add(self, name: str) -> None:
        from orchestrator.models.inference import check_base, is_merged, load_adapter, read_lineage, read_spec
        from orchestrator.models.loading import load_base_for_inference, load_tokenizer, resolve_base
        from orchestrator.tracking.registry import download_model

        # Downloaded, loaded into memory, removed: Serve kills a replica at shutdown, so a
        # directory kept for the replica's life would never be removed.
        with tempfile.TemporaryDirectory(prefix="orchestrator-serve-") as tmp:
            local = download_model(f"models:/{name}", Path(tmp) / name.replace("/", "-"), self.tracking_uri)
            spec = read_spec(local)
            if is_merged(local) or spec.peft.method in ("full", "freeze"):
                # A model of its own, loaded as `generate` loads it: no adapter to switch.
                self.whole[name] = load_adapter(local)
                self.specs[name] = spec
                return
            base = (spec.model.base, read_lineage(local).get("base_sha256"))
            if self.base is not None and base != self.base:
                raise ValueError(f"models:/{name} was trained on {base[0]}, not on the base the other served "
                                 f"versions share ({self.base[0]}): serve versions of one base together")
            base_path = resolve_base(spec.model)
            check_base(local, spec, base_path)
            if self.model is None:
                from peft import PeftModel

                # As `generate` loads it (models.inference.load_adapter): the base's revision, the
                # job's chat template.
                self.tokenizer = load_tokenizer(base_path, spec.model.trust_remote_code, spec.model.revision,
                                                spec.data.chat_template)
                # A replica given a GPU (k8s render --serve --gpu) holds the model there, as `generate` would.
                self.model = PeftModel.from_pretrained(load_base_for_inference(spec, base_path), str(local),
                                                       adapter_name=name)
                self.model.eval()
                self.base = base
            else:
                self.model.load_adapter(str(local), adapter_name=name)
        self.specs[name] = spec

    def _unload(self, name: str) -> None:
        """Drop version `name` (under the lock), or retire it while streams still use it."""
        if self.in_use[name]:
            self.retired.add(name)
            return
        if self.whole.pop(name, None) is None:
            self.model.delete_adapter(name)
        del self.specs[name]

    def _settle(self) -> None:
        """Count the streams gone since the last call (under the lock); unload the retired versions
        no stream uses any more. A stream's end is only queued where it happens (`weakref.finalize`
        runs wherever the generator is collected, perhaps in a thread holding the lock)."""
        while self._gone:
            name = self._gone.popleft()
            self.in_use[name] -= 1
            if self.in_use[name] <= 0:
                del self.in_use[name]
                if name in self.retired:
                    self.retired.discard(name)
                    self._unload(name)

    def models(self) -> dict[str, str]:
        """Served ref -> the version it is now served as."""
        return {ref: f"models:/{name}" for ref, name in self.active.items()}

    def _prompt(self, ref: str, prompt: str | None, messages: list[dict] | None):
        """(adapter name, Loaded, formatted text) of a request to `ref`: a prompt formatted as
        `orchestrator generate` formats it, or a chat (for a chat-trained adapter, the whole
        conversation through the chat template; else its last user message as the prompt)."""
        from orchestrator.models.inference import Loaded, format_prompt

        ref = model_id(ref)
        if ref not in self.active:
            raise KeyError(ref)
        name = self.active[ref]
        loaded = self.whole.get(name) or Loaded(model=self.model, tokenizer=self.tokenizer, spec=self.specs[name])
        if messages is not None and loaded.spec.data.format == "chat":
            return name, loaded, loaded.tokenizer.apply_chat_template(messages, tokenize=False,
                                                                      add_generation_prompt=True)
        if messages is not None:
            users = [m for m in messages if m.get("role") == "user"]
            prompt = str(users[-1]["content"]) if users else ""
        return name, loaded, format_prompt(loaded, prompt or "")

    @contextlib.contextmanager
    def _using(self, name: str):
        """The model with adapter `name` active, for one generation: set_adapter + generate is
        one step under the lock."""
        with self.lock:
            self._settle()
            self._activate(name)
            yield

    def _activate(self, name: str) -> None:
        """Make `name` the adapter the shared model runs (a whole model needs nothing)."""
        if name not in self.whole:
            self.model.set_adapter(name)

    def complete(self, ref: str, prompt: str | None = None, messages: list[dict] | None = None,
                 max_tokens: int = 64, decoding=None) -> tuple[str, int]:
        """Greedy completion with the adapter `ref` is served as (`_prompt` formats the request;
        `decoding`, a models.inference.Decoding, may sample or stop early), and the prompt's length
        in tokens: `complete_many` of one request."""
        answer = self.complete_many([dict(ref=ref, prompt=prompt, messages=messages, max_tokens=max_tokens,
                                          decoding=decoding)])[0]
        if isinstance(answer, Exception):
            raise answer
        return answer.text, answer.prompt_tokens

    def complete_many(self, requests: list[dict]) -> list:
        """The completions of several requests (each `complete`'s arguments as a dict), in their
        order: an `Answer` each, or the exception that request raised (a reference not
        served: KeyError), the others answered all the same.

        Greedy requests with the same `max_tokens` and stop strings are completed together,
        left-padded into one batch (`complete_batch`: the answers each would get alone, up to the
        last float bits of the padded positions), when they go to one version, or to LoRA adapters
        of the shared base (peft's mixed-adapter batch: each row through its own adapter); a prompt
        or prefix tuning adapter's batch generates prompts of one length at a time. A sampled
        request is completed alone, so its seed gives the answer it gives alone. All under the
        lock: the versions resolved, set and used in one step, a reload waits."""
        from orchestrator.models.inference import GREEDY, complete_batch

        answers: list = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        with self.lock:
            self._settle()
            prompts = []
            for i, r in enumerate(requests):
                try:
                    prompts.append(self._prompt(r["ref"], r.get("prompt"), r.get("messages")))
                except Exception as e:  # noqa: BLE001  this request's answer
                    prompts.append(None)
                    answers[i] = e
                    continue
                decoding = r.get("decoding") or GREEDY
                alone = i if decoding.samples else None
                name = prompts[i][0]
                shared = name if name in self.whole or self.specs[name].peft.method != "lora" else LORA
                groups.setdefault((shared, r.get("max_tokens", 64), decoding, alone), []).append(i)
            for (_, max_tokens, decoding, _), members in groups.items():
                names = [prompts[i][0] for i in members]
                self._activate(names[0])
                loaded = prompts[members[0]][1]
                try:
                    texts = complete_batch(loaded, [prompts[i][2] for i in members], max_new_tokens=max_tokens,
                                           batch_size=len(members), decoding=decoding,
                                           adapters=names if len(set(names)) > 1 else None)
                except Exception as e:  # noqa: BLE001  the group's answers
                    texts = [e] * len(members)
                for i, text in zip(members, texts):
                    answers[i] = text if isinstance(text, Exception) else Answer(
                        text, _count(loaded.tokenizer, prompts[i][2], prompt=True), _count(loaded.tokenizer, text),
                        len(members), f"models:/{prompts[i][0]}")
        return answers

    def stream(self, ref: str, prompt: str | None = None, messages: list[dict] | None = None,
               max_tokens: int = 64, decoding=None, cancel=None):
        """`complete`'s answer in pieces as the model writes them (a generator that joins to the same
        text; setting the threading.Event `cancel` stops it at the next token), as a `Stream`, by
        the version `ref` is served as now: a reload before the generation starts leaves that
        version loaded for it."""
        from orchestrator.models.inference import GREEDY, stream_formatted

        with self.lock:
            self._settle()
            name, loaded, text = self._prompt(ref, prompt, messages)
            self.in_use[name] += 1
        pieces = stream_formatted(loaded, text, max_tokens, guard=self._using(name), decoding=decoding or GREEDY,
                                  cancel=cancel)
        weakref.finalize(pieces, self._gone.append, name)  # read to the end, closed, or never started
        return Stream(pieces, _count(loaded.tokenizer, text, prompt=True),
                      lambda answer: _count(loaded.tokenizer, answer), f"models:/{name}")


def _count(tokenizer, text: str, prompt: bool = False) -> int:
    """Tokens of `text` (a prompt with the special tokens it is given, an answer without)."""
    return len(tokenizer(text, add_special_tokens=prompt)["input_ids"])
