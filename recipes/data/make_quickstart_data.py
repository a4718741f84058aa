"""Make the quickstart's small instruction data (deterministic; the output files are committed).

Three kinds of short, regular instructions a small model can learn in a few dozen LoRA steps:
unit conversions, arithmetic in words, and word spelling. Train and held-out rows never share
a question. Run: python recipes/data/make_quickstart_data.py
"""

import json
import random
from pathlib import Path

UNITS = [
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("kilograms", "grams", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("liters", "milliliters", 1000),
    ("days", "hours", 24),
    ("weeks", "days", 7),
    ("feet", "inches", 12),
    ("dollars", "cents", 100),
]
SINGULAR = {"feet": "foot", "inches": "inch"}
WORDS = [
    "apple",
    "river",
    "garden",
    "planet",
    "yellow",
    "window",
    "silver",
    "forest",
    "candle",
    "bridge",
    "rocket",
    "pencil",
    "guitar",
    "summer",
    "island",
    "dragon",
    "marble",
    "jacket",
    "orange",
    "violet",
]


def rows(rng: random.Random) -> list[dict]:
    out = []
    for a, b, k in UNITS:
        for n in range(2, 14):
            out.append(
                {
                    "instruction": f"Convert {n} {a} to {b}.",
                    "input": "",
                    "output": f"{n} {a} is {n * k} {b}, because one {SINGULAR.get(a, a[:-1])} is {k} {b}.",
                }
            )
    for _ in range(100):
        x, y = rng.randint(2, 60), rng.randint(2, 40)
        out.append(
            {
                "instruction": "Add the two numbers and answer in one sentence.",
                "input": f"{x} and {y}",
                "output": f"The sum of {x} and {y} is {x + y}.",
            }
        )
    for w in WORDS:
        out.append(
            {
                "instruction": f'Spell the word "{w}" letter by letter.',
                "input": "",
                "output": f'The word "{w}" is spelled {"-".join(w.upper())}.',
            }
        )
    rng.shuffle(out)
    return out


def main() -> None:
    rng = random.Random(0)
    data = rows(rng)
    seen, unique = set(), []
    for r in data:
        key = (r["instruction"], r["input"])
        if key not in seen:
            seen.add(key)
            unique.append(r)
    here = Path(__file__).parent
    held, train = unique[:40], unique[40:]
    for name, part in (("quickstart_train.jsonl", train), ("quickstart_heldout.jsonl", held)):
        (here / name).write_text("".join(json.dumps(r) + "\n" for r in part))
        print(name, len(part))


if __name__ == "__main__":
    main()
