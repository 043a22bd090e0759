"""Recipes read into `trainer.config.Recipe`: a YAML file and `section.key=value` overrides
(`load_recipe`), or a dict (`recipe_from_dict`), each value coerced to its field's type, an unknown key
answered with the key that was most likely meant."""
from __future__ import annotations

import dataclasses
import datetime
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from trainer.config import Recipe, RecipeError
from trainer.recipe_suggestions import meant_key


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    try:
        text = path.read_text()
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: the top level must be a mapping of sections")
    try:
        for override in overrides:
            _apply_override(raw, override)
        recipe = recipe_from_dict(raw)
        _unread_beside_mixture(recipe, overrides)
    except UnquotedText as error:  # named with the text as written in the file: 1.10, not 1.1
        raise RecipeError(f"{path}: {UnquotedText(error.key, error.value, _source_text(text, error.key))}") from None
    except RecipeError as error:
        raise RecipeError(f"{path}: {error}") from None
    return recipe


def _unread_beside_mixture(recipe: Recipe, overrides: list[str] | tuple[str, ...]) -> None:
    """data.mixture's entries replace data.path: a data.path given as an override beside a mixture would
    go unread (a recipe's mixture, then data.path=... on the command line). A mixture given as an
    override replaces the recipe file's data.path, as its comment says. (data.split, format and columns
    still apply beside a mixture: to data.eval_path, and to eval's eval.file.)"""
    if recipe.data.mixture and any(override.split("=", 1)[0].strip() == "data.path" for override in overrides):
        raise RecipeError(f"data.path={recipe.data.path}: not read, as data.mixture is set (each of its entries names "
                          f"its own path): add {{path: {recipe.data.path}}} to the mixture to train on it too, or set "
                          f"data.mixture=[] to train on it alone")


def _source_text(text: str, dotted: str) -> str | None:
    """The scalar at the key path `dotted` as written in the YAML `text`, or None."""
    node = yaml.compose(text)
    for part in dotted.split("."):
        if not isinstance(node, yaml.MappingNode):
            return None
        node = next((value for key, value in node.value if key.value == part), None)
    return node.value if isinstance(node, yaml.ScalarNode) else None


def recipe_from_dict(raw: dict[str, Any]) -> Recipe:
    unknown = _unknown_keys(Recipe, raw, prefix="")
    if len(unknown) > 1:  # all at once, not one per try (one alone: _build says it, as it says every other error)
        raise RecipeError("unknown keys: " + "; ".join(f"{key} ({meant})" for key, meant in unknown))
    recipe = _build(Recipe, raw, prefix="")
    recipe.validate()
    return recipe


def _apply_override(raw: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise RecipeError(f"override {override!r} must look like section.key=value")
    dotted, text = override.split("=", 1)
    keys = dotted.strip().split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {override!r}: {key} is not a section")
    node[keys[-1]] = OverrideText(text)  # read for its key's type in _coerce


class OverrideText(str):
    """A command-line override's value as typed. A text key takes it as it is (a '#' starts no comment,
    '1.10' is no number, '{instruction}' no mapping); quoted, as YAML reads the quotes ("a\\nb" has a
    newline). Any other key takes its YAML reading, so lists, numbers, booleans and null read naturally.
    A value inside a mapping (deepspeed.extra.X=, data.columns.X=) is read for the mapping's value type."""

    def read_as(self, kind: Any) -> Any:
        text = self.strip()
        if kind is str:
            if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
                try:
                    quoted = yaml.safe_load(text)
                except yaml.YAMLError:
                    quoted = None
                return quoted if isinstance(quoted, str) else text[1:-1]
            return None if text in ("", "null", "~") else text
        try:
            return yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            return text


def _read_overrides(value: Any, kind: Any) -> Any:
    """`value` with every OverrideText inside it read as `kind` (a mapping's value type)."""
    if isinstance(value, OverrideText):
        return value.read_as(kind)
    if isinstance(value, dict):
        return {key: _read_overrides(item, kind) for key, item in value.items()}
    return value


def _unknown_keys(kind: Any, raw: Any, prefix: str) -> list[tuple[str, str]]:
    """(section.key, what it likely means) for every key of `raw` that `kind`, its sections and the
    entries of its lists of sections (data.mixture) lack. Values of another shape are left to _build."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next(option for option in typing.get_args(kind) if option is not type(None))
    if isinstance(raw, OverrideText):
        raw = raw.read_as(kind)
    if typing.get_origin(kind) is list and isinstance(raw, list):
        (item,) = typing.get_args(kind)
        return [found for element in raw for found in _unknown_keys(item, element, prefix)]
    if not (dataclasses.is_dataclass(kind) and isinstance(raw, dict)):
        return []
    hints = typing.get_type_hints(kind)
    names = [f.name for f in dataclasses.fields(kind)]
    found = []
    for key, value in raw.items():
        if key not in names:
            found.append((f"{prefix}{key}", meant_key(str(key), prefix, names)))
        else:
            found += _unknown_keys(hints[key], value, f"{prefix}{key}.")
    return found


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise RecipeError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise RecipeError(f"unknown key {prefix}{key}; {meant_key(str(key), prefix, names)}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(kind: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "", "~")):
            if type(None) in typing.get_args(kind):
                return None
        return _coerce(options[0], value, key)
    if isinstance(value, OverrideText):
        value = value.read_as(kind)
    if dataclasses.is_dataclass(kind):
        return _build(kind, value or {}, prefix=f"{key}.")
    if origin is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise RecipeError(f"{key}: expected a list, got {value!r}")
        return [_coerce(item, v, key) for v in value]
    if origin is dict or kind is dict:
        glued = _glued_colon(value)
        space = f"; write `{glued.replace(':', ': ', 1)}` with a space after the colon" if glued else ""
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {value!r}{space}")
        if glued:
            raise RecipeError(f"{key}: {value!r} has the key {glued!r} without a value{space}")
        arguments = typing.get_args(kind)
        if len(arguments) == 2 and arguments[1] is str:
            return _read_overrides(value, str)
        # deepspeed.extra: YAML 1.1 reads 5e8 (no dot) as text, which DeepSpeed's integer options refuse.
        return _numbers_read(_read_overrides(value, Any))
    if kind is Any:
        return value
    return _scalar(kind, value, key)


def _glued_colon(value: Any) -> str | None:
    """The `key:value` written without a space where a mapping was meant: YAML reads `prompt:instruction`
    as one text, and `{prompt:instruction}` as the key 'prompt:instruction' without a value."""
    if isinstance(value, str):
        return value if ":" in value and ": " not in value else None
    if isinstance(value, dict):
        return next((str(name) for name, item in value.items() if item is None and ":" in str(name)), None)
    return None


# What YAML 1.1 leaves as text though it is a number: an exponent without a dot or a sign (5e8, 1e-3, 1.5e8).
# Quoted text without an exponent ("2024", "001": a job name) stays text.
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _numbers_read(value: Any) -> Any:
    """`value` with every text written as a number with an exponent (5e8, '1e-3') made that number: an int
    where it is whole and written without a dot."""
    if isinstance(value, dict):
        return {key: _numbers_read(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_numbers_read(item) for item in value]
    if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        number = float(value)
        return int(number) if number.is_integer() and "." not in value else number
    return value


class UnquotedText(RecipeError):
    """A text key given a number, boolean or date by YAML (`revision: 1.10` reads as 1.1)."""

    def __init__(self, key: str, value: Any, source: str | None = None):
        self.key, self.value = key, value
        source = str(value) if source is None else source
        kind = "boolean" if isinstance(value, bool) else "number" if isinstance(value, (int, float)) else "date"
        super().__init__(f"{key}: expected text, got the {kind} {value!r} (YAML reads an unquoted {source} as a "
                         f"{kind}); quote it: '{source}'")


def _scalar(kind: type, value: Any, key: str) -> Any:
    if value is None:
        raise RecipeError(f"{key}: needs a value, not empty or null")
    if kind is str and isinstance(value, (bool, int, float, datetime.date)):
        raise UnquotedText(key, value)  # stringified, 1.10 would silently become '1.1'
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
                return value.lower() in ("true", "yes", "1", "on")
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            if isinstance(value, os.PathLike):
                return os.fspath(value)
            if isinstance(value, str):
                return value
            raise ValueError
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise RecipeError(f"{key}: expected {kind.__name__}, got {value!r}")
