"""Script options given beside recipe overrides, as in

    python launch/eval.py RECIPE adapter=DIR out=DIR eval.max_new_tokens=32 train.micro_batch_size=4

`adapter=`, `out=` and `<section>.*` (eval. or export.) are the script's own; they are taken out of
argv first and the rest go to the recipe loader, which rejects unknown keys. An unknown key of our
own, or a near miss of one (`adpter=`, or `batch_size=` for eval.batch_size=), is an error that names
the valid ones; another trainer's name for a recipe key (`lr=`) is left for the recipe loader to name.
"""
from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from typing import Any, TypeVar

from trainer import cli
from trainer.config import Recipe, RecipeError
from trainer.recipe_suggestions import SYNONYMS, recipe_key_names

Options = TypeVar("Options")


def split_argv(argv: list[str], options_class: type, section: str) -> tuple[dict[str, str], list[str]]:
    """Our `key=value` pairs (by command-line name) and the rest of argv, in order."""
    top_level = _top_level_names(options_class)
    ours, rest = {}, []
    for arg in argv:
        key, has_value, value = arg.partition("=")
        if has_value and (key in top_level or key.startswith(f"{section}.")):
            ours[key] = value
        else:
            rest.append(arg)
    recipe_keys = [field.name for field in dataclasses.fields(Recipe)]
    names = [field.name for field in dataclasses.fields(options_class)]
    recipe_leaves = {name.rsplit(".", 1)[-1] for name in recipe_key_names()}
    for arg in rest:
        key, has_value, _ = arg.partition("=")
        head = key.split(".")[0]
        if not has_value or arg.startswith("-") or head in recipe_keys:
            continue
        if "." in key:  # a mistyped section: `evl.batch_size=`
            close = f"{section}." if difflib.get_close_matches(head, [section], n=1, cutoff=0.6) else None
        elif key not in names and (key.lower() in SYNONYMS or key in recipe_leaves):
            continue  # a recipe key without its section (`max_seq_len=`), another trainer's name (`lr=`):
            # the recipe loader names ours
        else:  # `adpter=`, or one of ours without its section: `batch_size=` means eval.batch_size=
            match = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            close = None if not match else f"{match[0]}=" if match[0] in top_level else f"{section}.{match[0]}="
        if close:
            raise RecipeError(f"unknown option {key}=; did you mean {close}?")
    return ours, rest


def parse_options(options_class: type[Options], given: dict[str, str], section: str) -> Options:
    """Build the options dataclass; `given` maps command-line names (`out`, `eval.batch_size`) to text."""
    top_level = _top_level_names(options_class)
    hints = typing.get_type_hints(options_class)
    names = [field.name for field in dataclasses.fields(options_class)]
    valid = [name if name in top_level else f"{section}.{name}" for name in names]
    values = {}
    for key, text in given.items():
        name = key if key in top_level else key.removeprefix(f"{section}.")
        if name not in names or (name not in top_level and key == name):
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}?" if close else f"valid: {', '.join(valid)}"
            raise RecipeError(f"unknown option {key}; {hint}")
        values[name] = _convert(hints[name], text, key)
    return options_class(**values)


def _top_level_names(options_class: type) -> tuple[str, ...]:
    return getattr(options_class, "TOP_LEVEL", ())


def _convert(kind: Any, text: str, key: str) -> Any:
    arguments = typing.get_args(kind)
    if type(None) in arguments:
        if text.strip().lower() in ("", "null", "none", "~"):  # as recipe keys read null
            return None
        kind = next(argument for argument in arguments if argument is not type(None))
    if kind is str:
        return text
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise RecipeError(f"{key}: expected an integer, got {text!r}") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise RecipeError(f"{key}: expected a number, got {text!r}") from None
    if kind is bool:
        if text.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return text.lower() in ("true", "yes", "1", "on")
        raise RecipeError(f"{key}: expected true or false, got {text!r}")
    raise TypeError(f"option {key}: unsupported type {kind}")


def main(run: typing.Callable[[Recipe, Any], object], options_class: type, section: str,
         argv: list[str] | None = None) -> None:
    """`trainer.cli.main` for scripts with their own options (errors and the process's end: cli.run_script)."""
    argv = sys.argv[1:] if argv is None else argv

    def body() -> None:
        given, rest = split_argv(argv, options_class, section)
        options = parse_options(options_class, given, section)
        recipe, _ = cli.parse(rest, known=("--debug",))  # no --dry-run: it would be ignored, and the work done
        run(recipe, options)

    cli.run_script(body, argv)
