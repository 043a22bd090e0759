"""Command-line entry shared by the launch scripts: `SCRIPT RECIPE [section.key=value ...]`.

Known failures (bad recipe, data, model, checkpoint) print one clear message and exit 2;
`--debug` or QLORA_DEBUG=1 shows the full traceback instead.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

from trainer.checkpoint import CheckpointError
from trainer.config import Recipe, RecipeError, load_recipe
from trainer.data import DataError
from trainer.model import ModelLoadError

KNOWN_ERRORS = (RecipeError, DataError, ModelLoadError, CheckpointError)


def parse(argv: list[str]) -> tuple[Recipe, list[str]]:
    # deepspeed's launcher appends --local_rank=N; LOCAL_RANK in the environment carries the same.
    args = [a for a in argv if not a.startswith("--local_rank")]
    flags = [a for a in args if a.startswith("--")]
    positional = [a for a in args if not a.startswith("--")]
    if not positional:
        raise RecipeError("usage: SCRIPT RECIPE.yaml [section.key=value ...]")
    return load_recipe(positional[0], positional[1:]), flags


def main(run: Callable[[Recipe], object], argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("QLORA_DEBUG") == "1"
    try:
        recipe, _ = parse(argv)
        run(recipe)
    except KNOWN_ERRORS as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
