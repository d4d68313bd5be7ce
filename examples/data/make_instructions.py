"""Writes trainer_lib/assets/instructions.jsonl, the small instruction set the examples train on.

Alpaca format (instruction / input / output), a few task families a tiny model can learn in
minutes on a CPU. Deterministic: running it again gives the same file.
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "Japan": "Tokyo", "Canada": "Ottawa", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "Sweden": "Stockholm",
    "Greece": "Athens", "Poland": "Warsaw", "Austria": "Vienna", "Ireland": "Dublin",
    "Chile": "Santiago", "Cuba": "Havana", "India": "New Delhi", "China": "Beijing",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark",
    "open": "closed", "early": "late", "full": "empty", "hard": "soft", "high": "low",
    "young": "old", "strong": "weak", "wet": "dry", "rich": "poor", "loud": "quiet",
}
COLORS = {
    "the sky": "blue", "grass": "green", "snow": "white", "coal": "black",
    "a banana": "yellow", "a tomato": "red", "an orange": "orange", "a plum": "purple",
    "chocolate": "brown", "a lemon": "yellow", "the sea": "blue", "a carrot": "orange",
}
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "robot", "candle",
         "garden", "silver", "planet", "window", "forest", "castle"]


def rows():
    for country, city in CAPITALS.items():
        yield dict(instruction=f"What is the capital of {country}?", input="",
                   output=f"The capital of {country} is {city}.")
    for word, opposite in OPPOSITES.items():
        yield dict(instruction="Give the opposite of the word.", input=word,
                   output=f"The opposite of {word} is {opposite}.")
    for thing, color in COLORS.items():
        yield dict(instruction=f"What color is {thing}?", input="",
                   output=f"{thing[0].upper() + thing[1:]} is {color}.")
    for word in WORDS:
        yield dict(instruction="Spell the word backwards.", input=word, output=word[::-1])
        yield dict(instruction="Write the word in capital letters.", input=word,
                   output=word.upper())
    rng = random.Random(0)
    for _ in range(40):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        yield dict(instruction="Add the two numbers.", input=f"{a} and {b}",
                   output=f"{a} + {b} = {a + b}")


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[2] / "trainer_lib" / "assets" / "instructions.jsonl"
    with open(out, "w", encoding="utf-8") as f:
        for row in rows():
            f.write(json.dumps(row) + "\n")
    print(f"wrote {out}")
