"""Writes trainer_lib/assets/feedback.jsonl, the thumbs-up / thumbs-down set the KTO example uses.

Built from the shipped instruction set (make_instructions.py): every instruction appears twice,
once with its correct answer (label true) and once with a plausible wrong one (label false), in
the Alpaca prompt format the SFT example trains on. Deterministic: running it again gives the
same file.
"""

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_instructions import CAPITALS, COLORS, OPPOSITES, rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from trainer_lib.methods.sft.samples import alpaca_prompt  # noqa: E402


def wrong_answer(row: dict, rng: random.Random) -> str:
    instruction, word = row["instruction"], row["input"]
    if instruction.startswith("What is the capital of"):
        country = instruction[len("What is the capital of "):-1]
        city = rng.choice([c for k, c in CAPITALS.items() if k != country])
        return f"The capital of {country} is {city}."
    if instruction.startswith("Give the opposite"):
        other = rng.choice([o for w, o in OPPOSITES.items() if w != word])
        return f"The opposite of {word} is {other}."
    if instruction.startswith("What color is"):
        thing = instruction[len("What color is "):-1]
        color = rng.choice(sorted({c for c in COLORS.values() if c != COLORS[thing]}))
        return f"{thing[0].upper() + thing[1:]} is {color}."
    if instruction.startswith("Spell the word backwards"):
        return word  # not reversed
    if instruction.startswith("Write the word in capital letters"):
        return word  # still lower case
    a, b = (int(x) for x in word.split(" and "))
    return f"{a} + {b} = {a + b + rng.choice([-3, -2, -1, 1, 2, 3])}"


def feedback():
    rng = random.Random(0)
    for row in rows():
        prompt = alpaca_prompt(row["instruction"], row["input"])
        yield dict(prompt=prompt, completion=row["output"], label=True)
        yield dict(prompt=prompt, completion=wrong_answer(row, rng), label=False)


if __name__ == "__main__":
    out = ROOT / "trainer_lib" / "assets" / "feedback.jsonl"
    with open(out, "w", encoding="utf-8") as f:
        for row in feedback():
            f.write(json.dumps(row) + "\n")
    print(f"wrote {out}")
