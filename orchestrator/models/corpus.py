"""The deterministic synthetic corpus the built-in demo base is pre-trained on: short English
documents about a small closed world (animals, their sounds/homes/sizes/legs, coloured objects,
places, numbers, people), generic instructions in the Alpaca prompt format
(`orchestrator.data.formats`) and a few chat-template conversations. Pure Python."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from orchestrator.data.formats import ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT

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
