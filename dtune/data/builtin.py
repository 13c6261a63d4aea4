"""The built-in dataset: instruction tasks whose answers are exact, generated deterministically.

Each family has one right answer per prompt (find_value, the long-context task, asks for a
value planted at a random depth of a long generated document), so held-out exact match measures what a run
learned. Train and held-out prompts come from separate random streams and never overlap.
`generate_pairs` turns the same prompts into preference pairs: the right answer chosen, a
subtly wrong one (a sum off by one, an amount left unconverted, malformed JSON, the items left
in the prompt's order) rejected.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
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


@dataclass(frozen=True)
class TaskOptions:
    document_lines: int = 64  # find_value's document length (data.builtin.document_lines)


def _add(rng: random.Random, _: TaskOptions) -> tuple[str, str]:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    return f"What is {a} + {b}?", str(a + b)


def _reverse_words(rng: random.Random, _: TaskOptions) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))


def _convert_units(rng: random.Random, _: TaskOptions) -> tuple[str, str]:
    src, dst, factor = rng.choice(UNITS)
    if rng.random() < 0.5:
        whole = rng.randint(2, 99)
        amount, value = str(whole), whole * factor
    else:
        tenths = rng.randint(11, 99)
        amount, value = f"{tenths // 10}.{tenths % 10}", tenths * factor // 10
    return f"Convert {amount} {src} to {dst}.", f"{value} {dst}"


def _extract_json(rng: random.Random, _: TaskOptions) -> tuple[str, str]:
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


def _sort_numbers(rng: random.Random, _: TaskOptions) -> tuple[str, str]:
    numbers = rng.sample(range(1, 100), rng.randint(3, 5))
    shown = ", ".join(map(str, numbers))
    return f"Sort from smallest to largest: {shown}", ", ".join(map(str, sorted(numbers)))


def _find_value(rng: random.Random, options: TaskOptions) -> tuple[str, str]:
    """A document of `document_lines` lines, each a locker (a word and a name, no two alike)
    and its four-digit code; the question asks for one of them, at a random depth."""
    keys = rng.sample([(w, n) for w in WORDS for n in NAMES], options.document_lines)
    codes = [f"{rng.randint(1000, 9999)}" for _ in keys]
    asked = rng.randrange(len(keys))
    lines = "\n".join(f"The {w} locker of {n} holds code {c}." for (w, n), c in zip(keys, codes))
    word, name = keys[asked]
    return (f"{lines}\n\nWhat code does the {word} locker of {name} hold?", codes[asked])


TASKS: dict[str, Callable[[random.Random, TaskOptions], tuple[str, str]]] = {
    "add": _add,
    "reverse_words": _reverse_words,
    "convert_units": _convert_units,
    "extract_json": _extract_json,
    "sort_numbers": _sort_numbers,
    "find_value": _find_value,
}
# the short tasks: the tiny test tokenizer is trained on them (corpus_for_tokenizer)
SHORT_TASKS = [task for task in TASKS if task != "find_value"]


def _record(task: str, prompt: str, answer: str) -> dict:
    return {
        "task": task,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ],
    }


def _stream(tasks: list[str], rng: random.Random,
            options: TaskOptions) -> Iterator[tuple[str, str, str]]:
    while True:
        for task in tasks:  # round-robin keeps every family equally represented
            prompt, answer = TASKS[task](rng, options)
            yield task, prompt, answer


def check_builtin(fmt: str, tasks: list[str]) -> None:
    """The settings of a built-in source: its format and its task names."""
    if fmt not in ("chat", "preference"):
        raise DtuneError(
            f"data.format={fmt!r} does not fit data.path=builtin, whose records are chat "
            "conversations (data.format=chat, data=builtin) or preference pairs "
            "(data.format=preference, data=builtin_preference); use one of those.")
    check_tasks(tasks)


def check_tasks(tasks: list[str]) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise DtuneError(
            f"data.builtin.tasks={tasks!r} names unknown tasks {unknown}; choose from "
            f"{', '.join(TASKS)}."
        )


def generate(tasks: list[str], train_size: int, eval_size: int, seed: int,
             make: Callable[[str, str, str], dict] = _record,
             options: TaskOptions = TaskOptions()) -> tuple[list, list]:
    """Return (train records, held-out records) in chat format, disjoint by prompt (`make`
    builds each record from its task, prompt and answer)."""
    check_tasks(tasks)
    seen: set[str] = set()
    held_out = _take(tasks, random.Random(f"held-out-{seed}"), eval_size, seen, make, options)
    train = _take(tasks, random.Random(f"train-{seed}"), train_size, seen, make, options)
    return train, held_out


# --- preference pairs: the same prompts, the right answer chosen, a subtly wrong one rejected


def _off_by_one(rng: random.Random, prompt: str, answer: str) -> str:
    return str(int(answer) + rng.choice((-1, 1)))


def _swap_neighbours(items: list[str], rng: random.Random) -> list[str]:
    i = rng.randrange(len(items) - 1)  # items are distinct (sampled), so the swap shows
    items[i], items[i + 1] = items[i + 1], items[i]
    return items


def _prompt_order(separator: str):
    """The prompt's items, left in the order they came: copying is the mistake a small model
    makes (SmolLM2-135M prefers it for 95% of held-out prompts), where two swapped items it
    prefers for about half. Swapped neighbours when the prompt was already in order."""
    def wrong(rng: random.Random, prompt: str, answer: str) -> str:
        given = prompt.split(": ", 1)[1]
        if given != answer:
            return given
        return separator.join(_swap_neighbours(answer.split(separator), rng))
    return wrong


def _unconverted(rng: random.Random, prompt: str, answer: str) -> str:
    """The amount as given, in the target unit: the conversion forgotten. (The right number
    in the source unit was too easy a tell: SmolLM2 ranked it below the right answer for
    every held-out prompt, leaving DPO nothing to learn.)"""
    amount = prompt.removeprefix("Convert ").split(" ", 1)[0]
    return f"{amount} {answer.split(' ', 1)[1]}"


def _malformed_json(rng: random.Random, prompt: str, answer: str) -> str:
    breaks = (
        lambda text: text[:-1],  # the closing brace missing
        lambda text: text.replace('"', "'"),  # single quotes
        lambda text: text.replace(", ", " ", 1),  # a comma missing
    )
    return rng.choice(breaks)(answer)


def _another_code(rng: random.Random, prompt: str, answer: str) -> str:
    """Another locker's code from the same document: found, but the wrong line."""
    codes = [line.rsplit(" ", 1)[1].rstrip(".") for line in prompt.split("\n\n")[0].split("\n")]
    return rng.choice([c for c in codes if c != answer] or [str(int(answer) % 9000 + 1000)])


# For each task, a wrong answer close to the right one; the seed and the prompt fix it.
WRONG: dict[str, Callable[[random.Random, str, str], str]] = {
    "add": _off_by_one,
    "reverse_words": _prompt_order(" "),
    "convert_units": _unconverted,
    "extract_json": _malformed_json,
    "sort_numbers": _prompt_order(", "),
    "find_value": _another_code,
}


def generate_pairs(tasks: list[str], train_size: int, eval_size: int,
                   seed: int, options: TaskOptions = TaskOptions()) -> tuple[list, list]:
    """(train pairs, held-out pairs) for data.format=preference: the prompts `generate` gives
    for the same seed (as chat messages ending in the user turn), the right answer as
    `chosen` and a subtly wrong one (see WRONG) as `rejected`."""
    def pair(task: str, prompt: str, answer: str) -> dict:
        rng = random.Random(f"rejected-{seed}-{prompt}")
        return {"task": task, "messages": _record(task, prompt, answer)["messages"][:2],
                "chosen": answer, "rejected": WRONG[task](rng, prompt, answer)}

    return generate(tasks, train_size, eval_size, seed, pair, options)


def _take(tasks: list[str], rng: random.Random, count: int, seen: set[str],
          make: Callable[[str, str, str], dict] = _record,
          options: TaskOptions = TaskOptions()) -> list[dict]:
    """`count` records (`make(task, prompt, answer)`) whose prompts are not in `seen` (which
    grows with them)."""
    records: list[dict] = []
    for task, prompt, answer in _stream(tasks, rng, options):
        if len(records) == count:
            break
        if prompt not in seen:
            seen.add(prompt)
            records.append(make(task, prompt, answer))
    return records


def corpus_for_tokenizer() -> Iterator[str]:
    """Text the tiny test tokenizer is trained on: every family's vocabulary and format."""
    train, _ = generate(SHORT_TASKS, 2000, 0, seed=12345)
    for record in train:
        for message in record["messages"]:
            yield message["role"] + "\n" + message["content"]
