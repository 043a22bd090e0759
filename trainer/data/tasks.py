"""The built-in task dataset (`builtin:tasks`): short generated instructions with checkable answers
(reverse a word, add two numbers, ...), written once into the cache; no network needed. Each question
(a task and its argument) appears once, in one phrasing: the held-out rows are questions the training
rows never ask, not only rows they do not repeat word for word."""
from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path

from trainer.runtime.cache import cache_dir, exclusive

DEMO_ROWS = 3000
SEED = 1234
# The generator's version, in the cached file's path: a changed generator is written afresh, not read
# from an older cache. 2: each question once (version 1 asked some questions again in other words);
# 3: "7 + 20" and "20 + 7" are one question.
VERSION = 3

WORDS = """
cat dog sun run red big box cup hat pen map bus car bed egg fox jam key leg man
net owl pig rat sky toy van web yes zoo ant bat cow den ear fan gum hen ink jet
kit log mud nut oak pot rug sea tea top arm bag bee bow day eye fig gap hop ice
joy kid lip mix now oil pie rim sip tip toe wax zip apple bread chair cloud dance
eagle field grape horse juice knife lemon mouse night ocean paper queen river
snake table tiger water world zebra bird book cake door fish frog gold hand kite
lamp milk moon nest rain ring rose salt ship shoe snow star tree wind wolf yard
blue cold fast green happy light small sweet tall warm baby bell coat corn drum farm
fire gift hill iron leaf lion nose park road sand seed song
""".split()


def _word(rng: random.Random, max_len: int = 5) -> str:
    return rng.choice([word for word in WORDS if len(word) <= max_len])


# Each sampler returns (argument, answer); answers stay within 12 characters.
Sampler = Callable[[random.Random], tuple[str, str]]


def _on_word(transform: Callable[[str], str]) -> Sampler:
    def sample(rng: random.Random) -> tuple[str, str]:
        word = _word(rng)
        return word, transform(word)
    return sample


def _uppercase(rng: random.Random) -> tuple[str, str]:
    phrase = f"{_word(rng, 4)} {_word(rng, 4)}"
    return phrase, phrase.upper()


def _add(rng: random.Random) -> tuple[str, str]:
    first, second = rng.randint(0, 20), rng.randint(0, 20)
    return f"{first} + {second}", str(first + second)


def _sort_digits(rng: random.Random) -> tuple[str, str]:
    digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 4))]
    return " ".join(map(str, digits)), " ".join(map(str, sorted(digits)))


def _larger(rng: random.Random) -> tuple[str, str]:
    first, second = rng.sample(range(100), 2)
    return f"{first} or {second}", str(max(first, second))


def _count(rng: random.Random) -> tuple[str, str]:
    items = [_word(rng, 4) for _ in range(rng.randint(1, 6))]
    return ", ".join(items), str(len(items))


# name: (sampler, instructions used with an input, instructions with the argument folded in)
TASKS: dict[str, tuple[Sampler, list[str], list[str]]] = {
    "reverse": (_on_word(lambda word: word[::-1]),
                ["Reverse the word.", "Write the word backwards.", "Spell the word in reverse order."],
                ["Reverse the word {}.", "Write {} backwards."]),
    "repeat": (_on_word(lambda word: f"{word} {word}"),
               ["Repeat the word twice.", "Say the word two times."], ["Repeat the word {} twice."]),
    "uppercase": (_uppercase, ["Convert the text to uppercase.", "Write the phrase in capital letters."],
                  ["Write {} in uppercase."]),
    "add": (_add, ["Add the two numbers.", "What is the sum of the numbers?"], ["What is {}?", "Compute {}."]),
    "sort_digits": (_sort_digits, ["Sort the digits in ascending order.",
                                   "Put the digits in order from smallest to largest."], ["Sort these digits: {}"]),
    "larger": (_larger, ["Which number is larger?", "Give the larger of the two numbers."], ["Which is larger, {}?"]),
    "count": (_count, ["How many items are in the list?", "Count the words in the list."],
              ["How many words are in this list: {}?"]),
    "first_letter": (_on_word(lambda word: word[0]),
                     ["What is the first letter of the word?", "Give the first letter of the word."],
                     ["What is the first letter of {}?"]),
    "last_letter": (_on_word(lambda word: word[-1]),
                    ["What is the last letter of the word?", "Give the last letter of the word."],
                    ["What is the last letter of {}?"]),
}


# Tasks whose two operands ask one question in either order ("7 + 20", "20 + 7")
SYMMETRIC = ("add", "larger")


def question(name: str, argument: str) -> tuple[str, str]:
    """What a row asks, whatever its phrasing: the task and its argument, the operands of a
    symmetric task in one order."""
    return name, (" ".join(sorted(argument.split())) if name in SYMMETRIC else argument)


def demo_rows(count: int = DEMO_ROWS, seed: int = SEED, distinct: bool = False) -> list[dict[str, str]]:
    """The built-in task rows, identical on every call with the same arguments. `distinct`: no question
    (`question`) twice, in any phrasing: a question already asked is drawn again (the word tasks
    run out of words first, and the others take their place). Without it (the tiny base's tokenizer
    corpus), questions repeat as drawn."""
    rng = random.Random(seed)
    task_names = sorted(TASKS)
    rows = []
    asked: set[tuple[str, str]] = set()  # questions
    draws = 0
    while len(rows) < count:
        draws += 1
        if draws > 100 * count:
            raise ValueError(f"the built-in tasks hold fewer than {count} distinct questions")
        name = rng.choice(task_names)
        sample, with_input, without_input = TASKS[name]
        argument, answer = sample(rng)
        if distinct:
            if (asked_now := question(name, argument)) in asked:
                continue
            asked.add(asked_now)
        # A third of the rows fold the argument into the instruction, to exercise the no-input template.
        if rng.random() < 1 / 3:
            rows.append({"instruction": rng.choice(without_input).format(argument), "input": "", "output": answer})
        else:
            rows.append({"instruction": rng.choice(with_input), "input": argument, "output": answer})
    return rows


DEMO_DATASETS = {"tasks": DEMO_ROWS}


def ensure_demo_data(name: str = "tasks") -> Path:
    """Write the built-in task set to cache_dir()/data/v<VERSION>/<name>.jsonl once; return its path."""
    if name not in DEMO_DATASETS:
        raise ValueError(f"unknown built-in dataset {name!r}; known: {sorted(DEMO_DATASETS)}")
    path = cache_dir() / "data" / f"v{VERSION}" / f"{name}.jsonl"
    if path.exists():  # only ever appears complete, through the rename below
        return path
    with exclusive(f"data-{name}"):
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = path.with_name(f".{path.name}.building")
            staging.write_text("".join(json.dumps(row) + "\n" for row in demo_rows(DEMO_DATASETS[name], distinct=True)))
            os.replace(staging, path)
    return path


def resolve_dataset(path: str) -> str:
    """`builtin:<dataset>` -> its file (written on first use); any other path unchanged."""
    if not path.startswith("builtin:"):
        return path
    name = path.removeprefix("builtin:")
    if name not in DEMO_DATASETS:
        known = ", ".join(f"builtin:{known_name}" for known_name in DEMO_DATASETS)
        raise ValueError(f"unknown built-in dataset {path!r}; known: {known}")
    return str(ensure_demo_data(name))
