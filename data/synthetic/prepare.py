"""Generates N Alpaca rows of made-up but varied text, to measure the data pipeline at scale:

    python data/synthetic/prepare.py --rows 1000000 --out data/synthetic/synthetic.jsonl [--seed 0]

Rows mix task kinds (summarise a passage, answer a question, write about two things, do a sum, list
facts, rewrite a sentence), with and without an input, and lengths from a few words to a few
kilobytes (about 400 bytes a line on average), so tokenising, truncation and packing see a realistic
spread. Rows are written as they are made (constant memory) in blocks seeded by (seed, block number), so
the output depends only on the seed and the first N rows of a longer run are the N-row run.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "synthetic.jsonl"
BLOCK_ROWS = 8192
POOL_SENTENCES = 40_000

WORDS = """
the a of and to in is was that for on with as by at from it this be are or an which have not
time people year way day man thing woman life child world school state family student group country
problem hand part place case week company system program question work government number night point
home water room mother area money story fact month lot right study book eye job word business issue
side kind head house service friend father power hour game line end member law car city community
name president team minute idea kid body information back parent face others level office door health
person art war history party result change morning reason research girl guy moment air teacher force
river garden market winter summer bridge engine signal harbour forest letter window island village
quickly slowly often never always carefully early late together almost nearly quietly
make take see know get give find think tell become show leave feel bring begin keep hold write stand
hear let mean set meet run pay sit speak lie lead read grow lose fall send build stay understand
good new first last long great little own other old big high different small large next young
important few public bad same able early local late hard major better economic strong possible
""".split()
TOPICS = """
volcanoes bees lighthouses bicycles glaciers coffee tides libraries trains compilers sourdough
chess comets rivers orchards submarines kites batteries owls deserts violins bridges satellites
""".split()


def sentence_pool(rng: np.random.Generator) -> tuple[str, np.ndarray]:
    """A long text of capitalised sentences (5-24 words) and the offset where each sentence starts."""
    lengths = rng.integers(5, 25, POOL_SENTENCES)
    picks = rng.integers(0, len(WORDS), int(lengths.sum()))
    sentences, start = [], 0
    for length in lengths.tolist():
        words = [WORDS[i] for i in picks[start:start + length].tolist()]
        start += length
        sentences.append(" ".join(words).capitalize() + ".")
    starts = np.cumsum([0] + [len(s) + 1 for s in sentences[:-1]])
    return " ".join(sentences), starts


def passage(pool: str, starts: np.ndarray, first: int, length: int) -> str:
    """Whole sentences from sentence `first` on, about `length` characters of them."""
    begin = int(starts[first])
    end = pool.find(". ", begin + max(length, 1))
    return pool[begin:] if end < 0 else pool[begin:end + 1]


def block(rows: int, seed: int, index: int, pool: str, starts: np.ndarray) -> str:
    """The first `rows` JSON lines of block `index`, decided by (seed, index) alone."""
    rng = np.random.default_rng([seed, 1, index])
    # Drawn for a whole block whatever `rows` is, so a shorter last block is a prefix of the full one.
    kinds = rng.integers(0, 6, BLOCK_ROWS)
    # Log-normal lengths: mostly short, a long tail up to a few kilobytes (cut at 6,000 characters).
    input_lengths = np.minimum(rng.lognormal(4.8, 0.9, BLOCK_ROWS), 6000).astype(int)
    output_lengths = np.minimum(rng.lognormal(4.8, 0.9, BLOCK_ROWS), 6000).astype(int)
    has_input = rng.random(BLOCK_ROWS) < 0.6
    firsts = rng.integers(0, len(starts) - 200, (BLOCK_ROWS, 2))
    numbers = rng.integers(2, 10_000, (BLOCK_ROWS, 2))
    topics = rng.integers(0, len(TOPICS), (BLOCK_ROWS, 2))
    lines = []
    for i in range(rows):
        kind = int(kinds[i])
        a, b = int(numbers[i, 0]), int(numbers[i, 1])
        first_topic, second_topic = TOPICS[topics[i, 0]], TOPICS[topics[i, 1]]
        text = passage(pool, starts, int(firsts[i, 0]), int(input_lengths[i])) if has_input[i] else ""
        answer = passage(pool, starts, int(firsts[i, 1]), int(output_lengths[i]))
        if kind == 0:
            instruction = "Summarise the following passage in a few sentences." if text else \
                f"Summarise what is known about {first_topic}."
        elif kind == 1:
            instruction = f"Answer the question about {first_topic} using the context." if text else \
                f"Why do {first_topic} matter to people who study {second_topic}?"
        elif kind == 2:
            instruction = f"Write a short paragraph connecting {first_topic} and {second_topic}."
        elif kind == 3:
            instruction, text, answer = "Add the two numbers.", f"{a} + {b}", f"{a} + {b} = {a + b}"
        elif kind == 4:
            instruction = f"List {a % 5 + 2} facts about {first_topic}."
            facts = answer.rstrip(".").split(". ")[:a % 5 + 2]
            answer = "\n".join(f"{n}. {fact}." for n, fact in enumerate(facts, start=1))
        else:
            instruction = "Rewrite the text in plain words." if text else f"Describe {first_topic} to a child."
        lines.append(json.dumps({"instruction": instruction, "input": text, "output": answer}))
    return "\n".join(lines) + "\n"


def generate(rows: int, out: Path, seed: int = 0) -> int:
    """Writes `rows` rows to `out` (renamed into place when complete); returns the bytes written."""
    pool, starts = sentence_pool(np.random.default_rng([seed, 0]))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.writing")
    try:
        with open(staging, "w", encoding="utf-8") as file:
            for index, first_row in enumerate(range(0, rows, BLOCK_ROWS)):
                file.write(block(min(BLOCK_ROWS, rows - first_row), seed, index, pool, starts))
        os.replace(staging, out)
    finally:
        staging.unlink(missing_ok=True)
    return out.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, required=True, help="rows to write")
    parser.add_argument("--out", type=Path, default=OUT, help=f"JSON lines to write (default: {OUT})")
    parser.add_argument("--seed", type=int, default=0, help="the same seed writes the same rows (default: 0)")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.seed < 0:
        parser.error("--rows must be at least 1 and --seed at least 0")
    started = time.perf_counter()
    size = generate(args.rows, args.out, args.seed)
    seconds = time.perf_counter() - started
    print(f"wrote {args.rows} rows ({size / 1e6:.1f} MB, {size / args.rows:.0f} bytes a row) to {args.out} "
          f"in {seconds:.1f} s: {args.rows / seconds:,.0f} rows/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
