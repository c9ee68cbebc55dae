"""Built-in demo base models that are built locally instead of downloaded.

``builtin:tiny-llama`` is a ~0.8M-parameter Llama (standard HF module names:
``q_proj``/``k_proj``/``v_proj``/``o_proj``/``gate_proj``/``up_proj``/``down_proj``)
with its own byte-level BPE tokenizer, pre-trained for well under a minute on one CPU
core on a deterministic synthetic English corpus about a small closed world
(animals, their sounds/homes/sizes/legs, coloured objects, places, numbers, people)
plus generic instruction/response examples in the Alpaca prompt format of
:mod:`orchestrator.prompt_templates`.  It exists so that the whole pipeline
(data loading, (Q)LoRA training, evaluation, merging, serving) can be demonstrated
and tested end to end without network access or a GPU.

Usage::

    path = resolve_builtin("builtin:tiny-llama")   # builds on first call (~1 min), cached
    AutoModelForCausalLM.from_pretrained(path); AutoTokenizer.from_pretrained(path)

The build is deterministic (byte-identical ``tokenizer.json`` and ``model.safetensors``
for the same recipe and library versions), cached under
``$XDG_CACHE_HOME/orchestrator/builtin`` (default ``~/.cache/orchestrator/builtin``)
in a directory whose name carries a hash of the recipe, built into a temporary
directory and atomically renamed into place under an ``fcntl.flock`` lock, so
concurrent callers (e.g. several Ray workers on one node) build it only once.

Heavy imports (torch, transformers, tokenizers) are done lazily so that
:func:`is_builtin` is cheap to call.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.prompt_templates import ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT

BUILTIN_PREFIX = "builtin:"

# Bump when the corpus generator or build procedure changes in a way that changes
# the produced model (it is part of the recipe hash, so caches are invalidated).
CORPUS_VERSION = "tiny-world-v1"
BUILD_VERSION = "1"

# Written last into a finished model directory.
BUILD_INFO_FILE = "builtin_build_info.json"

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
SYSTEM_TOKEN = "<|system|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, SYSTEM_TOKEN]

# Each turn renders as "<|role|>\n{content}<|eos|>\n", preceded once by <|bos|>;
# add_generation_prompt appends "<|assistant|>\n".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported role: ' + message['role'] + ' (expected system, user or assistant)') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


# --------------------------------------------------------------------------------------
# The closed world of the synthetic corpus (also used by jobs/data/make_quickstart_data.py)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Animal:
    name: str
    plural: str
    sound: str
    size: str  # tiny / small / big / huge
    legs: str  # "no", "two", "four", "six"
    home: str  # e.g. "farm"
    home_prep: str  # "on" / "in" ("a cow lives on the farm", "a duck lives in the pond")


ANIMALS: tuple[Animal, ...] = (
    Animal("dog", "dogs", "woof", "small", "four", "house", "in"),
    Animal("cat", "cats", "meow", "small", "four", "house", "in"),
    Animal("cow", "cows", "moo", "big", "four", "farm", "on"),
    Animal("pig", "pigs", "oink", "big", "four", "farm", "on"),
    Animal("sheep", "sheep", "baa", "big", "four", "hill", "on"),
    Animal("horse", "horses", "neigh", "big", "four", "field", "in"),
    Animal("duck", "ducks", "quack", "small", "two", "pond", "in"),
    Animal("frog", "frogs", "ribbit", "tiny", "four", "pond", "in"),
    Animal("hen", "hens", "cluck", "small", "two", "barn", "in"),
    Animal("goat", "goats", "bleat", "big", "four", "hill", "on"),
    Animal("lion", "lions", "roar", "big", "four", "grassland", "in"),
    Animal("elephant", "elephants", "trumpet", "huge", "four", "grassland", "in"),
    Animal("parrot", "parrots", "squawk", "small", "two", "jungle", "in"),
    Animal("owl", "owls", "hoot", "small", "two", "forest", "in"),
    Animal("wolf", "wolves", "howl", "big", "four", "forest", "in"),
    Animal("bear", "bears", "growl", "huge", "four", "cave", "in"),
    Animal("bee", "bees", "buzz", "tiny", "six", "hive", "in"),
    Animal("snake", "snakes", "hiss", "small", "no", "grass", "in"),
    Animal("mouse", "mice", "squeak", "tiny", "four", "barn", "in"),
    Animal("crow", "crows", "caw", "small", "two", "tree", "in"),
    Animal("donkey", "donkeys", "bray", "big", "four", "farm", "on"),
)
ANIMALS_BY_NAME: dict[str, Animal] = {a.name: a for a in ANIMALS}

OBJECTS: tuple[str, ...] = (
    "ball", "cup", "hat", "box", "book", "lamp", "chair", "table", "bed", "key",
    "shoe", "sock", "spoon", "bag", "kite", "drum", "bell", "clock", "car", "boat",
)
COLORS: tuple[str, ...] = (
    "red", "blue", "green", "yellow", "black", "white", "brown", "pink", "orange", "purple", "gray",
)
SIZES: tuple[str, ...] = ("tiny", "small", "big", "huge")
PLACES: tuple[str, ...] = (
    "park", "farm", "forest", "pond", "house", "garden", "school", "river",
    "hill", "town", "beach", "barn", "field", "cave", "jungle", "zoo",
)
NAMES: tuple[str, ...] = ("Tom", "Anna", "Ben", "Mia", "Sam", "Lily", "Max", "Zoe", "Leo", "Ella")
NUMBERS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve",
)
MOVES: tuple[str, ...] = ("runs", "walks", "goes", "comes back")
ACTIVITIES: tuple[str, ...] = ("sleeps", "plays", "eats", "hides", "sits", "rests")
FEELINGS: tuple[str, ...] = ("happy", "sad", "tired", "hungry", "glad")
FURNITURE: tuple[str, ...] = ("table", "chair", "bed", "floor")
FIXED_FACTS: tuple[str, ...] = (
    "The sky is blue.", "The grass is green.", "The sun is yellow.", "Snow is white.",
    "The night is black.", "A banana is yellow.", "An apple is red.", "The sea is blue.",
)


def _plural_object(obj: str) -> str:
    return obj + "es" if obj.endswith(("x", "s", "ch", "sh")) else obj + "s"


def _an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


# --------------------------------------------------------------------------------------
# Deterministic corpus generator
# --------------------------------------------------------------------------------------


class TinyWorldCorpus:
    """Deterministic generator of short English documents about the closed world.

    Document kinds: animal profiles (facts), short stories, mixed fact lists, generic
    instruction/response examples in the Alpaca prompt format (the builder appends
    the EOS token to every document) and a few chat-template conversations.  It
    never produces the demo fine-tuning task (five-sentence animal descriptions, see
    jobs/data/make_quickstart_data.py) nor its instructions.
    """

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    # -- sentences -------------------------------------------------------------------
    def _fact(self, a: Animal) -> str:
        r = self.rng
        the = r.choice(("The", "An" if a.name[0] in "aeiou" else "A"))
        k = r.randrange(9)
        if k == 0:
            return f"{the} {a.name} says {a.sound}."
        if k == 1:
            return f"{_cap(a.plural)} say {a.sound}."
        if k == 2:
            return f"{the} {a.name} is {a.size}."
        if k == 3:
            return f"{the} {a.name} has {a.legs} legs."
        if k == 4:
            return f"{the} {a.name} lives {a.home_prep} the {a.home}."
        if k == 5:
            return f"{the} {a.name} is an animal."
        if k == 6:
            return f"The {a.size} {a.name} lives {a.home_prep} the {a.home} and says {a.sound}."
        if k == 7:
            return f"{r.choice(NAMES)} hears a {a.sound}. It is {_an(a.name)}."
        return f"{_cap(a.plural)} live {a.home_prep} the {a.home}."

    def _scene(self, name: str, a: Animal, color: str, place: str) -> str:
        k = self.rng.randrange(5)
        if k == 0:
            return f"{name} sees {_an(color)} {a.name} at the {place}."
        if k == 1:
            return f"There is {_an(color)} {a.name} at the {place}."
        if k == 2:
            return f"{_cap(_an(color))} {a.name} {self.rng.choice(MOVES)} to the {place}."
        if k == 3:
            return f"{name} finds {_an(color)} {a.name} in the {place}."
        return f"{_cap(_an(color))} {a.name} {self.rng.choice(ACTIVITIES)} at the {place}."

    def _object_sentence(self) -> str:
        r = self.rng
        obj, color, name = r.choice(OBJECTS), r.choice(COLORS), r.choice(NAMES)
        k = r.randrange(8)
        if k == 0:
            return f"{name} has {_an(color)} {obj}."
        if k == 1:
            n = r.randrange(2, len(NUMBERS))
            return f"{name} has {NUMBERS[n]} {color} {_plural_object(obj)}."
        if k == 2:
            return f"The {obj} is {color}."
        if k == 3:
            return f"The {r.choice(SIZES)} {obj} is in the {r.choice(PLACES)}."
        if k == 4:
            return f"{_cap(_an(obj))} is a thing. It is not an animal."
        if k == 5:
            return f"The {color} {obj} is on the {r.choice(FURNITURE)}."
        if k == 6:
            return f"{name} gives the {obj} to {r.choice(NAMES)}."
        return f"{name} finds {_an(r.choice(SIZES))} {color} {obj} at the {r.choice(PLACES)}."

    def _number_sentence(self) -> str:
        r = self.rng
        k = r.randrange(4)
        if k == 0:
            a, b = r.randrange(0, 7), r.randrange(0, 6)
            return f"{_cap(NUMBERS[a])} and {NUMBERS[b]} make {NUMBERS[a + b]}."
        if k == 1:
            n = r.randrange(0, len(NUMBERS) - 1)
            return f"After {NUMBERS[n]} comes {NUMBERS[n + 1]}."
        if k == 2:
            n = r.randrange(0, len(NUMBERS) - 3)
            return f"{_cap(NUMBERS[n])}, {NUMBERS[n + 1]}, {NUMBERS[n + 2]}."
        return r.choice(FIXED_FACTS)

    # -- documents -------------------------------------------------------------------
    def _profile(self) -> str:
        a = self.rng.choice(ANIMALS)
        return " ".join(self._fact(a) for _ in range(self.rng.randrange(3, 6)))

    def _story(self) -> str:
        r = self.rng
        name, place, a, color = r.choice(NAMES), r.choice(PLACES), r.choice(ANIMALS), r.choice(COLORS)
        sents = [self._scene(name, a, color, place)]
        extra = [
            f"The {color} {a.name} says {a.sound}.",
            f"The {a.name} is {a.size}.",
            f"The {a.name} lives {a.home_prep} the {a.home}.",
            f"The {color} {a.name} {r.choice(ACTIVITIES)} at the {place}.",
            f"{name} likes the {color} {a.name}.",
            f"{name} has {_an(r.choice(COLORS))} {r.choice(OBJECTS)}.",
            f"{name} is {r.choice(FEELINGS)}.",
        ]
        r.shuffle(extra)
        sents.extend(extra[: r.randrange(1, 5)])
        return " ".join(sents)

    def _mixed(self) -> str:
        r = self.rng
        out = []
        for _ in range(r.randrange(3, 6)):
            k = r.random()
            if k < 0.4:
                out.append(self._fact(r.choice(ANIMALS)))
            elif k < 0.8:
                out.append(self._object_sentence())
            else:
                out.append(self._number_sentence())
        return " ".join(out)

    # -- generic instruction tasks (Alpaca format) -----------------------------------
    def _instruction(self) -> tuple[str, str, str]:
        r = self.rng
        a = r.choice(ANIMALS)
        k = r.randrange(20)
        if k < 6:  # questions about a described scene
            name, color, place = r.choice(NAMES), r.choice(COLORS), r.choice(PLACES)
            scene = self._scene(name, a, color, place)
            if k == 0:
                return "What color is the animal?", scene, f"It is {color}."
            if k == 1:
                return "Where is the animal?", scene, f"At the {place}."
            if k == 2:
                return "Which animal is it?", scene, f"{_cap(_an(a.name))}."
            if k == 3:
                return "What does the animal say?", scene, f"The {a.name} says {a.sound}."
            if k == 4:
                return "Where does the animal live?", scene, f"It lives {a.home_prep} the {a.home}."
            return "Repeat the sentence.", scene, scene
        if k == 6:
            return "Name a color.", "", r.choice(COLORS)
        if k == 7:
            return "Name an animal.", "", a.name
        if k == 8:
            n = r.randrange(2, 9)
            return f"Count to {NUMBERS[n]}.", "", " ".join(NUMBERS[1 : n + 1])
        if k == 9:
            n = r.randrange(0, len(NUMBERS) - 1)
            return f"What comes after {NUMBERS[n]}?", "", f"{_cap(NUMBERS[n + 1])}."
        if k == 10:
            x, y = r.randrange(0, 7), r.randrange(0, 6)
            return "Add the numbers.", f"{NUMBERS[x]} and {NUMBERS[y]}", f"{_cap(NUMBERS[x + y])}."
        if k == 11:
            return f"What does {_an(a.name)} say?", "", f"{_cap(_an(a.name))} says {a.sound}."
        if k == 12:
            return f"Where does {_an(a.name)} live?", "", f"{_cap(_an(a.name))} lives {a.home_prep} the {a.home}."
        if k == 13:
            if r.random() < 0.5:
                return "Is it an animal or a thing?", a.name, "It is an animal."
            return "Is it an animal or a thing?", r.choice(OBJECTS), "It is a thing."
        if k == 14:
            if r.random() < 0.5:
                return "Make the word plural.", a.name, a.plural
            o = r.choice(OBJECTS)
            return "Make the word plural.", o, _plural_object(o)
        if k == 15:
            w = r.choice([r.choice(OBJECTS), r.choice(COLORS), a.name])
            return "Say the word two times.", w, f"{w} {w}"
        if k == 16:
            o, c = r.choice(OBJECTS), r.choice(COLORS)
            return "What color is it?", f"The {o} is {c}.", f"It is {c}."
        if k == 17:
            return f"How many legs does {_an(a.name)} have?", "", f"{_cap(_an(a.name))} has {a.legs} legs."
        if k == 18:
            return "Which animal says this?", a.sound, f"The {a.name}."
        return f"Is {_an(a.name)} big or small?", "", f"{_cap(_an(a.name))} is {a.size}."

    def _alpaca(self) -> str:
        instruction, inp, out = self._instruction()
        if inp:
            prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=inp)
        else:
            prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
        return prompt + out

    def _chat(self) -> str:
        r = self.rng
        text = ""
        if r.random() < 0.5:
            text += f"{SYSTEM_TOKEN}\nYou are a helpful assistant.{EOS_TOKEN}\n"
        for _ in range(r.randrange(1, 3)):
            instruction, inp, out = self._instruction()
            user = f"{instruction}\n{inp}" if inp else instruction
            text += f"{USER_TOKEN}\n{user}{EOS_TOKEN}\n{ASSISTANT_TOKEN}\n{out}{EOS_TOKEN}\n"
        # The builder wraps every document as <|bos|> doc <|eos|>; a chat already ends
        # with its own EOS, so drop the final one here.
        return text[: -len(f"{EOS_TOKEN}\n")]

    def document(self) -> str:
        k = self.rng.random()
        if k < 0.2:
            return self._profile()
        if k < 0.4:
            return self._story()
        if k < 0.5:
            return self._mixed()
        if k < 0.93:
            return self._alpaca()
        return self._chat()

    def documents(self, n: int | None = None) -> Iterator[str]:
        i = 0
        while n is None or i < n:
            yield self.document()
            i += 1


# --------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltinModelSpec:
    """Everything that determines a built-in model (hashed into its cache directory)."""

    name: str
    description: str
    model_config: dict[str, Any] = field(default_factory=dict)
    tokenizer_vocab_size: int = 1024
    tokenizer_docs: int = 20000
    seed: int = 1234
    steps: int = 1200
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 6e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    corpus_version: str = CORPUS_VERSION
    build_version: str = BUILD_VERSION

    def recipe(self) -> dict[str, Any]:
        """The fields that determine the built artifacts (``description`` excluded)."""
        recipe = dataclasses.asdict(self)
        recipe.pop("description")
        return recipe

    def recipe_hash(self) -> str:
        blob = json.dumps(self.recipe(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def dir_name(self) -> str:
        return f"{self.name}-{self.recipe_hash()}"


BUILTIN_MODELS: dict[str, BuiltinModelSpec] = {
    "tiny-llama": BuiltinModelSpec(
        name="tiny-llama",
        description=(
            "~0.8M-parameter Llama (3 layers, hidden 128, GQA 4/2 heads) with a 1k byte-level "
            "BPE tokenizer, pre-trained in under a minute on one CPU core on a synthetic "
            "closed-world English corpus plus generic Alpaca-format instructions."
        ),
        model_config=dict(
            hidden_size=128,
            # Every linear layer's input width must be a multiple of 64: bitsandbytes' CPU 4-bit
            # kernel reshapes weights into 64-wide quantization blocks (352 fails, 384 works).
            intermediate_size=384,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            initializer_range=0.02,
            tie_word_embeddings=False,
            hidden_act="silu",
        ),
    ),
}


def is_builtin(base: str) -> bool:
    """True if ``base`` names a built-in model (``builtin:<name>``)."""
    return isinstance(base, str) and base.startswith(BUILTIN_PREFIX)


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/orchestrator` (default `~/.cache/orchestrator`): built-in bases, tokenized data."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "orchestrator"


def default_cache_dir() -> Path:
    return cache_root() / "builtin"


def _lookup(base: str) -> BuiltinModelSpec:
    name = base[len(BUILTIN_PREFIX) :] if is_builtin(base) else base
    spec = BUILTIN_MODELS.get(name)
    if spec is None:
        known = ", ".join(BUILTIN_PREFIX + k for k in sorted(BUILTIN_MODELS))
        raise ValueError(f"unknown built-in model {base!r}; known built-in models: {known}")
    return spec


def resolve_builtin(
    base: str,
    cache_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Return the local directory of built-in model ``base`` (e.g. ``"builtin:tiny-llama"``).

    Builds it on the first call (about a minute on one CPU core) and caches it; later
    calls return immediately.  Safe to call concurrently from several processes.
    ``progress(step, total)`` is called during pre-training if given.
    Raises ``ValueError`` for an unknown name.
    """
    return _resolve_spec(_lookup(base), cache_dir=cache_dir, progress=progress)


def _is_complete(path: Path) -> bool:
    return (path / BUILD_INFO_FILE).is_file()


def _resolve_spec(
    spec: BuiltinModelSpec,
    cache_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache_dir / spec.dir_name()
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
    """Build tokenizer + pre-trained model of ``spec`` into ``out_dir`` (deterministic)."""
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
    }
    # Written last: its presence marks a complete build.
    (out_dir / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
