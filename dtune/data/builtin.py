"""The built-in dataset: instruction tasks whose answers are exact, generated deterministically.

Each family has one right answer per prompt, so held-out exact match measures what a run
learned. Train and held-out prompts come from separate random streams and never overlap.
"""
from __future__ import annotations

import json
import random
from typing import Callable, Iterator

from dtune.errors import DtuneError

SYSTEM_PROMPT = "Reply with the answer only."

WORDS = (
    "apple river stone cloud tiger paper window garden silver orange candle forest bread "
    "mirror rocket pencil valley ocean thunder basket lemon castle dragon feather jacket "
    "ladder marble needle pillow rabbit saddle tomato violin wagon anchor bottle carpet "
    "desert engine falcon glove harbor island jungle kettle lantern meadow nickel oyster "
    "parrot quartz ribbon salmon tunnel umbrella velvet walnut yellow zebra bridge comet "
    "dolphin ember fossil glacier hammer igloo jasmine koala lizard magnet"
).split()

NAMES = (
    "Maria Ahmed Chen Olga Tomas Priya Kofi Lena Diego Yuki Ines Omar Sara Pavel Nia Hugo "
    "Amara Felix Rosa Ivan Mei Jonas Leila Mateo Anya Kenji Zara Luca Ada Bruno"
).split()

CITIES = (
    "Lima Oslo Cairo Lyon Kyoto Quito Perth Accra Porto Riga Seoul Dakar Turin Hanoi Bern "
    "Graz Cork Nice Pune Fez"
).split()

UNITS = (  # (from, to, factor)
    ("km", "m", 1000),
    ("m", "cm", 100),
    ("kg", "g", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("liters", "milliliters", 1000),
)


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    return f"What is {a} + {b}?", str(a + b)


def _reverse_words(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))


def _convert_units(rng: random.Random) -> tuple[str, str]:
    src, dst, factor = rng.choice(UNITS)
    if rng.random() < 0.5:
        whole = rng.randint(2, 99)
        amount, value = str(whole), whole * factor
    else:
        tenths = rng.randint(11, 99)
        amount, value = f"{tenths // 10}.{tenths % 10}", tenths * factor // 10
    return f"Convert {amount} {src} to {dst}.", f"{value} {dst}"


def _extract_json(rng: random.Random) -> tuple[str, str]:
    name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 90)
    sentence = rng.choice(
        (
            f"{name} is {age} years old and lives in {city}.",
            f"Meet {name} from {city}, aged {age}.",
            f"In {city} lives {name}, who is {age}.",
            f"{name} ({age}) moved to {city} last year.",
        )
    )
    answer = json.dumps({"name": name, "age": age, "city": city})
    return f"Extract name, age and city as JSON: {sentence}", answer


def _sort_numbers(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(1, 100), rng.randint(3, 5))
    shown = ", ".join(map(str, numbers))
    return f"Sort from smallest to largest: {shown}", ", ".join(map(str, sorted(numbers)))


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add,
    "reverse_words": _reverse_words,
    "convert_units": _convert_units,
    "extract_json": _extract_json,
    "sort_numbers": _sort_numbers,
}


def _record(task: str, prompt: str, answer: str) -> dict:
    return {
        "task": task,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ],
    }


def _stream(tasks: list[str], rng: random.Random) -> Iterator[tuple[str, str, str]]:
    while True:
        for task in tasks:  # round-robin keeps every family equally represented
            prompt, answer = TASKS[task](rng)
            yield task, prompt, answer


def generate(tasks: list[str], train_size: int, eval_size: int, seed: int) -> tuple[list, list]:
    """Return (train records, held-out records) in chat format, disjoint by prompt."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise DtuneError(
            f"data.builtin.tasks={tasks!r} names unknown tasks {unknown}; choose from "
            f"{', '.join(TASKS)}."
        )
    seen: set[str] = set()
    held_out = _take(tasks, random.Random(f"held-out-{seed}"), eval_size, seen)
    train = _take(tasks, random.Random(f"train-{seed}"), train_size, seen)
    return train, held_out


def _take(tasks: list[str], rng: random.Random, count: int, seen: set[str]) -> list[dict]:
    """`count` records whose prompts are not in `seen` (which grows with them)."""
    records: list[dict] = []
    for task, prompt, answer in _stream(tasks, rng):
        if len(records) == count:
            break
        if prompt not in seen:
            seen.add(prompt)
            records.append(_record(task, prompt, answer))
    return records


def corpus_for_tokenizer() -> Iterator[str]:
    """Text the tiny test tokenizer is trained on: every family's vocabulary and format."""
    train, _ = generate(list(TASKS), 2000, 0, seed=12345)
    for record in train:
        for message in record["messages"]:
            yield message["role"] + "\n" + message["content"]
