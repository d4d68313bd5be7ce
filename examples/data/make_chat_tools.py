"""Writes trainer_lib/assets/chat_tools.jsonl: conversations with tool calls for
examples/sft_chat_tools.py.

Two tools with disjoint argument schemas (get_weather(city), convert_units(value, from_unit,
to_unit)); each conversation is system / user / assistant tool call / tool result / assistant
answer, in the OpenAI messages format. Deterministic.
"""

import json
import random
from pathlib import Path

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
CONVERT_TOOL = {"type": "function", "function": {
    "name": "convert_units", "description": "Convert a value between units",
    "parameters": {"type": "object", "properties": {
        "value": {"type": "number"}, "from_unit": {"type": "string"},
        "to_unit": {"type": "string"}}, "required": ["value", "from_unit", "to_unit"]}}}
CITIES = ["Paris", "Berlin", "Rome", "Madrid", "Lisbon", "Tokyo", "Ottawa", "Cairo", "Lima",
          "Oslo", "Athens", "Vienna", "Dublin", "Warsaw", "Nairobi"]
SKIES = ["sunny", "cloudy", "rainy", "windy", "snowy"]
UNITS = [("km", "miles", 0.621), ("kg", "pounds", 2.205), ("meters", "feet", 3.281)]
SYSTEM = "You are a helpful assistant with tools."


def weather(rng, city):
    sky, temp = rng.choice(SKIES), rng.randint(-5, 32)
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"What is the weather in {city}?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": {"city": city}}}]},
        {"role": "tool", "content": json.dumps({"city": city, "sky": sky, "celsius": temp})},
        {"role": "assistant", "content": f"It is {sky} in {city}, {temp} degrees Celsius."},
    ]


def convert(rng, value, unit):
    src, dst, factor = unit
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"How many {dst} is {value} {src}?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "convert_units",
            "arguments": {"value": value, "from_unit": src, "to_unit": dst}}}]},
        {"role": "tool", "content": json.dumps({"result": round(value * factor, 1)})},
        {"role": "assistant", "content": f"{value} {src} is {round(value * factor, 1)} {dst}."},
    ]


def rows():
    rng = random.Random(0)
    for city in CITIES:
        yield {"messages": weather(rng, city), "tools": [WEATHER_TOOL, CONVERT_TOOL]}
    for _ in range(30):
        yield {"messages": convert(rng, rng.randint(1, 50), rng.choice(UNITS)),
               "tools": [WEATHER_TOOL, CONVERT_TOOL]}


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[2] / "trainer_lib" / "assets" / "chat_tools.jsonl"
    with open(out, "w", encoding="utf-8") as f:
        for row in rows():
            f.write(json.dumps(row) + "\n")
    print(f"wrote {out}")
