"""The registered versions a replica serves: one base model with every adapter version loaded into
it (peft multi-adapter), and each merged, full or freeze version as a model of its own. Each
request picks its version by the registered reference it was served as (`models:/NAME@ALIAS`).
`load` re-resolves the references, so a moved alias is served after the next load; a version a
streamed answer was resolved to stays loaded until that stream is done."""

from __future__ import annotations

import collections
import contextlib
import itertools
import queue
import tempfile
import threading
import time
import weakref
from concurrent.futures import Future
from pathlib import Path
from typing import NamedTuple


LORA = "LoRA adapters"  # with a shared model's key: the batch group of LoRA adapters that peft mixes
# Requests a replica completes together at most (`serve --max-batch`): concurrent greedy requests with
# the same max_tokens and stop strings share one batched generation, streamed or not. A batch gathers
# for up to BATCH_WAIT_S after its first request.
MAX_BATCH = 8
BATCH_WAIT_S = 0.01
PROMPT_LEARNING = ("prompt_tuning", "prefix_tuning")  # their batches take prompts of one length


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
    in tokens, a function counting the answer's tokens, the version that answers, and how many
    streams generate in its batch, itself included."""

    pieces: object
    prompt_tokens: int
    count: object
    version: str
    batch_size: int = 1


class _Waiting(NamedTuple):
    """A streamed request waiting for its batch: the group it may share a batch with
    (`ServedAdapters._group`), its version, model, formatted prompt, max_tokens, decoding and stop
    flag, and where its batch sends (its pieces, the batch's size) once it starts."""

    group: tuple
    name: str
    loaded: object
    text: str
    max_tokens: int
    decoding: object
    cancel: threading.Event
    batched: Future


# A replica's stream batcher leaves after this long without a stream (the next stream starts another):
# no thread keeps an unused ServedAdapters, and its model, alive.
BATCHER_IDLE_S = 30.0


def shared_key(spec) -> tuple:
    """Which adapter versions one peft model can hold: one PEFT method, on the base loaded as the
    job loads it (dtype, quantization, attention kernel; the base itself is checked apart)."""
    m, q = spec.model, spec.quantization
    quantized = (q.bits, q.quant_type, q.double_quant) if q.bits == 4 else (q.bits,)  # the rest only for 4-bit
    return (spec.peft.method, m.dtype, m.attn_implementation, quantized)


class ServedAdapters:
    """Versions loaded once each, under the names `NAME/VERSION`: adapters of one base in one peft
    model per PEFT method and way of loading the base (`shared_key`): peft combines adapters of one
    type only, and an adapter answers as `generate` answers for it only on the base loaded as its
    job loads it (a QLoRA version on the 4-bit base, a LoRA version trained in bf16 on the bf16
    one). Whole models (merged, full, freeze) on their own."""

    def __init__(self, refs: list[str], tracking_uri: str, max_batch: int = MAX_BATCH,
                 batch_wait_s: float = BATCH_WAIT_S):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        self.refs = [model_id(r) for r in refs]
        self.tracking_uri = tracking_uri
        self.shared: dict[tuple, object] = {}  # shared_key -> the peft model holding those adapters
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
        self._streams: queue.Queue = queue.Queue()  # streamed requests waiting for a batch (_batch_streams)
        self._batcher: threading.Thread | None = None
        self._alone = itertools.count()  # a sampled request's group of its own

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
            if self.tokenizer is None:
                # As `generate` loads it (models.inference.load_adapter): the base's revision, the
                # job's chat template.
                self.tokenizer = load_tokenizer(base_path, spec.model.trust_remote_code, spec.model.revision,
                                                spec.data.chat_template)
                self.base = base
            key = shared_key(spec)
            if key not in self.shared:
                from peft import PeftModel

                # A replica given a GPU (k8s render --serve --gpu) holds the model there, as `generate` would.
                self.shared[key] = PeftModel.from_pretrained(load_base_for_inference(spec, base_path), str(local),
                                                             adapter_name=name)
                self.shared[key].eval()
            else:
                self.shared[key].load_adapter(str(local), adapter_name=name)
        self.specs[name] = spec

    def model_of(self, name: str):
        """The peft model that holds adapter version `name` (loaded, not a whole model)."""
        return self.shared[shared_key(self.specs[name])]

    def _unload(self, name: str) -> None:
        """Drop version `name` (under the lock), or retire it while streams still use it."""
        if self.in_use[name]:
            self.retired.add(name)
            return
        if self.whole.pop(name, None) is None:
            key = shared_key(self.specs[name])
            if len(self.shared[key].peft_config) == 1:  # the model's last adapter: its copy of the base goes too
                del self.shared[key]
            else:
                self.shared[key].delete_adapter(name)
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
        loaded = self.whole.get(name) or Loaded(model=self.model_of(name), tokenizer=self.tokenizer,
                                                spec=self.specs[name])
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
            self.model_of(name).set_adapter(name)

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

    def _group(self, name: str, loaded, text: str, max_tokens: int, decoding) -> tuple:
        """What a request may share a batch with: greedy requests with the same `max_tokens` and
        stop strings, to one version or to LoRA adapters of the shared base that peft can mix in one
        batch (`_mixes`); to a prompt or prefix tuning adapter, only with prompts of one length (a
        padded prompt would shift its positions). A sampled request shares with none, so its seed
        gives the answer it gives alone."""
        from orchestrator.models.inference import prompt_ids

        method = None if name in self.whole else self.specs[name].peft.method
        length = len(prompt_ids(loaded.tokenizer, text)) if method in PROMPT_LEARNING else None
        mixed = method == "lora" and self._mixes(name)
        return ((LORA, shared_key(self.specs[name])) if mixed else name, length, max_tokens, decoding,
                next(self._alone) if decoding.samples else None)

    def _mixes(self, name: str) -> bool:
        """Whether LoRA version `name` may share peft's mixed-adapter batch with the other LoRA
        versions (each row through its own adapter, `adapter_names`). peft refuses DoRA there
        ("Cannot pass `adapter_names` when DoRA is enabled"), and any batch at all once an adapter
        of the model targets parameters (a mixture of experts' fused expert weights: "does not
        support mixed adapter batches yet")."""
        configs = self.model_of(name).peft_config
        return not configs[name].use_dora and not any(getattr(c, "target_parameters", None) for c in configs.values())

    def complete_many(self, requests: list[dict]) -> list:
        """The completions of several requests (each `complete`'s arguments as a dict), in their
        order: an `Answer` each, or the exception that request raised (a reference not
        served: KeyError), the others answered all the same.

        The requests that may share a batch (`_group`) are completed together, left-padded into one
        batch (`complete_batch`: the answers each would get alone, up to the last float bits of the
        padded positions). All under the lock: the versions resolved, set and used in one step, a
        reload waits."""
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
                name, loaded, text = prompts[i]
                groups.setdefault(self._group(name, loaded, text, r.get("max_tokens", 64), r.get("decoding") or GREEDY),
                                  []).append(i)
            for (_, _, max_tokens, decoding, _), members in groups.items():
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
               max_tokens: int = 64, decoding=None, cancel=None) -> Stream:
        """`complete`'s answer in pieces as the model writes them, as a `Stream` (a generator joining
        to the answer `complete_many` gives the request in the same batch; setting the
        threading.Event `cancel` stops it at the next token), by the version `ref` is served as
        now: a reload before the generation starts leaves that version loaded for it.

        Streams that arrive together generate as one batch, grouped as `complete_many` groups
        (`_batch_streams`); returns once this one's batch has started."""
        from orchestrator.models.inference import GREEDY

        decoding = decoding or GREEDY
        with self.lock:
            self._settle()
            name, loaded, text = self._prompt(ref, prompt, messages)
            self.in_use[name] += 1
            waiting = _Waiting(self._group(name, loaded, text, max_tokens, decoding), name, loaded, text, max_tokens,
                               decoding, cancel if cancel is not None else threading.Event(), Future())
            self._streams.put(waiting)  # under the lock: a batcher leaving when idle sees it
            if self._batcher is None:
                self._batcher = threading.Thread(target=self._batch_streams, daemon=True, name="stream-batcher")
                self._batcher.start()
        try:
            pieces, batch_size = waiting.batched.result()
        except BaseException:
            self._gone.append(name)
            raise
        weakref.finalize(pieces, self._gone.append, name)  # read to the end, closed, or never started
        return Stream(pieces, _count(loaded.tokenizer, text, prompt=True),
                      lambda answer: _count(loaded.tokenizer, answer), f"models:/{name}", batch_size)

    def _batch_streams(self) -> None:
        """The replica's stream batcher, a thread while streams come: it takes the first stream
        waiting, gathers those that arrive within `batch_wait_s` (and any already waiting) that
        share its group, up to `max_batch`, and starts their batch; the next batch forms when this
        one's generation has ended, from the streams that came meanwhile. It leaves after
        BATCHER_IDLE_S without a stream."""
        waiting: list[_Waiting] = []
        while True:
            if not waiting:
                try:
                    waiting.append(self._streams.get(timeout=BATCHER_IDLE_S))
                except queue.Empty:
                    with self.lock:
                        if self._streams.empty():
                            self._batcher = None
                            return
                    continue
            with contextlib.suppress(queue.Empty):  # those that came while the last batch generated
                while True:
                    waiting.append(self._streams.get_nowait())
            deadline = time.monotonic() + self.batch_wait_s
            while (sum(w.group == waiting[0].group for w in waiting) < self.max_batch
                   and (left := deadline - time.monotonic()) > 0):
                try:
                    waiting.append(self._streams.get(timeout=left))
                except queue.Empty:
                    break
            batch = [w for w in waiting if w.group == waiting[0].group][:self.max_batch]
            waiting = [w for w in waiting if all(w is not b for b in batch)]
            self._start_stream_batch(batch).wait()
            del batch  # its streams' pieces are their readers' alone: a stream dropped is collected

    def _start_stream_batch(self, batch: list[_Waiting]) -> threading.Event:
        """Start generating `batch` (`stream_batch`, under the lock with its first version set) and
        hand each stream its pieces; returns an event set when the generation has ended."""
        from orchestrator.models.inference import stream_batch

        names = [w.name for w in batch]
        ended = threading.Event()

        @contextlib.contextmanager
        def generating():
            try:
                with self._using(names[0]):
                    yield
            finally:
                ended.set()

        try:
            readers = stream_batch(batch[0].loaded, [w.text for w in batch], batch[0].max_tokens, guard=generating(),
                                   decoding=batch[0].decoding, cancels=[w.cancel for w in batch],
                                   adapters=names if len(set(names)) > 1 else None)
        except Exception as e:  # noqa: BLE001  the batch's answers
            ended.set()
            for w in batch:
                w.batched.set_exception(e)
            return ended
        for w, reader in zip(batch, readers):
            w.batched.set_result((reader, len(batch)))
        return ended


def _count(tokenizer, text: str, prompt: bool = False) -> int:
    """Tokens of `text` (a prompt with the special tokens it is given, an answer without)."""
    return len(tokenizer(text, add_special_tokens=prompt)["input_ids"])
