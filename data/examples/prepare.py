"""Writes one small example file per format the trainer reads, from rows written out below:

    alpaca.json       a JSON list of {instruction, input, output}
    alpaca.jsonl      the same fields, one object a line
    chat.jsonl        {messages: [{role, content}, ...]}, roles system / user / assistant
    instances.jsonl   {instruction, instances: [{input, output}, ...]}: one row per instance

    python data/examples/prepare.py            # rewrites data/examples/*.json(l); they are committed

The output depends on nothing but this file, so the committed files can be checked against it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

ALPACA = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "1. Eat a balanced diet with plenty of fruit and vegetables.\n2. Exercise regularly.\n"
               "3. Get enough sleep and keep a consistent schedule."},
    {"instruction": "Translate the sentence into French.", "input": "The café opens at seven.",
     "output": "Le café ouvre à sept heures."},
    {"instruction": "Add the two numbers.", "input": "17 + 25", "output": "42"},
    {"instruction": "Classify the sentiment of the review as positive or negative.",
     "input": "The battery died after two days and support never answered.", "output": "negative"},
    {"instruction": "Name the largest planet in the solar system.", "input": "", "output": "Jupiter"},
]

ALPACA_LINES = [
    {"instruction": "Reverse the word.", "input": "lemon", "output": "nomel"},
    {"instruction": "Write a haiku about autumn rain.", "input": "",
     "output": "Cold rain on red leaves\nthe gutter sings all night long\nmorning smells of earth"},
    {"instruction": "Convert the temperature from Celsius to Fahrenheit.", "input": "20 °C", "output": "68 °F"},
    {"instruction": "Summarise the paragraph in one sentence.",
     "input": "Bees visit flowers to collect nectar. While doing so they carry pollen from one flower to "
              "the next, which lets many plants produce fruit and seeds.",
     "output": "Bees pollinate plants while collecting nectar, helping them make fruit and seeds."},
]

CHAT = [
    {"messages": [
        {"role": "user", "content": "What is the capital of Japan?"},
        {"role": "assistant", "content": "The capital of Japan is Tokyo."}]},
    {"messages": [
        {"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant",
         "content": "Air scatters blue light more than red light, so blue reaches us from every direction."}]},
    {"messages": [
        {"role": "user", "content": "I have 3 apples and buy 4 more. How many do I have?"},
        {"role": "assistant", "content": "You have 3 + 4 = 7 apples."},
        {"role": "user", "content": "And if I eat two of them?"},
        {"role": "assistant", "content": "Then 7 - 2 = 5 apples are left."}]},
]

INSTANCES = [
    {"id": "example_task_0", "name": "antonyms", "instruction": "Give the opposite of the word.",
     "instances": [{"input": "hot", "output": "cold"}, {"input": "early", "output": "late"},
                   {"input": "empty", "output": "full"}],
     "is_classification": False},
    {"id": "example_task_1", "name": "even_or_odd", "instruction": "Is the number even or odd?",
     "instances": [{"input": "14", "output": "even"}, {"input": "9", "output": "odd"}],
     "is_classification": True},
    {"id": "example_task_2", "name": "breakfast_idea", "instruction": "Suggest a quick breakfast without eggs.",
     "instances": [{"input": "", "output": "Oatmeal with banana slices and a spoon of peanut butter."}],
     "is_classification": False},
]


def write(directory: Path) -> dict[str, int]:
    """The four files written into `directory`; returns the records written per file name."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {"alpaca.json": ALPACA, "alpaca.jsonl": ALPACA_LINES, "chat.jsonl": CHAT, "instances.jsonl": INSTANCES}
    for name, rows in files.items():
        if name.endswith(".jsonl"):
            content = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        else:
            content = json.dumps(rows, indent=2, ensure_ascii=False) + "\n"
        (directory / name).write_text(content, encoding="utf-8")
    return {name: len(rows) for name, rows in files.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=HERE, help=f"where to write them (default: {HERE})")
    args = parser.parse_args(argv)
    for name, count in write(args.out_dir).items():
        print(f"wrote {count} records to {args.out_dir / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
