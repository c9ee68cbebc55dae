#!/usr/bin/env python
"""Generate the quickstart demo fine-tuning data set (Alpaca format, JSON lines).

    python jobs/data/make_quickstart_data.py            # rewrites train.jsonl / eval.jsonl
    python jobs/data/make_quickstart_data.py --check    # exit 1 if the files are stale

The task, "describe the animal", is never shown to the built-in base model
``builtin:tiny-llama`` during pre-training.  The input is a sentence that mentions an
animal together with a colour and a place (distractors); the response is a fixed
five-sentence description of that animal built from the closed world the base model
was pre-trained on (``orchestrator.models.corpus.ANIMALS``: size, legs, sound, home)::

    ### Instruction:
    Describe the animal.

    ### Input:
    I saw a brown dog at the park.

    ### Response:
    It is a dog. It is small. It has four legs. It says woof. It lives in the house.

The base model knows the facts (it answers "What does a dog say?") but answers this
instruction with a short, different sentence; a LoRA adapter learns the new format in
well under 100 steps.  Eval examples use (animal, colour, place) combinations that
never occur in train, and a quarter of them use an instruction phrasing that never
occurs in train.  With the built-in tokenizer, prompt + response + EOS is 60-73 tokens.
Deterministic: running it again writes the same bytes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from orchestrator.models.corpus import ANIMALS, COLORS, NAMES, PLACES  # noqa: E402

SEED = 20240611
N_TRAIN = 2000
N_EVAL = 200

TRAIN_INSTRUCTIONS = (
    "Describe the animal.",
    "Tell me about this animal.",
    "Write a short description of the animal.",
)
HELD_OUT_INSTRUCTIONS = ("Give a description of this animal.",)
HELD_OUT_INSTRUCTION_FRACTION = 0.25


def _an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def render_input(rng: random.Random, animal: str, color: str, place: str) -> str:
    form = rng.randrange(3)
    if form == 0:
        return f"There is {_an(color)} {animal} at the {place}."
    if form == 1:
        return f"I saw {_an(color)} {animal} at the {place}."
    return f"{rng.choice(NAMES)} sees {_an(color)} {animal} at the {place}."


def render_description(animal) -> str:
    return (
        f"It is {_an(animal.name)}. It is {animal.size}. It has {animal.legs} legs. "
        f"It says {animal.sound}. It lives {animal.home_prep} the {animal.home}."
    )


def make_examples() -> tuple[list[dict], list[dict]]:
    rng = random.Random(SEED)
    combos = [(a, c, p) for a in ANIMALS for c in COLORS for p in PLACES]
    rng.shuffle(combos)
    eval_combos, train_pool = combos[:N_EVAL], combos[N_EVAL:]
    train_combos = rng.sample(train_pool, N_TRAIN)

    def example(combo, instruction: str) -> dict:
        animal, color, place = combo
        return {
            "instruction": instruction,
            "input": render_input(rng, animal.name, color, place),
            "output": render_description(animal),
        }

    train = [example(c, rng.choice(TRAIN_INSTRUCTIONS)) for c in train_combos]
    n_held = int(N_EVAL * HELD_OUT_INSTRUCTION_FRACTION)
    evals = [
        example(c, rng.choice(HELD_OUT_INSTRUCTIONS if i < n_held else TRAIN_INSTRUCTIONS))
        for i, c in enumerate(eval_combos)
    ]
    return train, evals


def _dump(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=HERE / "quickstart")
    ap.add_argument("--check", action="store_true", help="only verify the files are up to date")
    args = ap.parse_args(argv)
    train, evals = make_examples()
    outputs = {args.out_dir / "train.jsonl": _dump(train), args.out_dir / "eval.jsonl": _dump(evals)}
    if args.check:
        stale = [str(p) for p, text in outputs.items() if not p.is_file() or p.read_text() != text]
        if stale:
            print("stale:", ", ".join(stale))
            return 1
        print("up to date")
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for path, text in outputs.items():
        path.write_text(text)
        print(f"wrote {path} ({text.count(chr(10))} examples)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
