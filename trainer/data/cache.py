"""Tokenised datasets cached on disk, so a second run (and every rank after the first) skips
reading and tokenising.

The key covers everything the examples depend on: the source's identity (path, size and mtime,
or a `datasets` fingerprint), the tokenizer (a hash of its full definition), the data settings
that shape examples, and the code that makes them. A file appears only complete (temp file, then
os.replace), so ranks that read while rank 0 writes see the old state or the new, never half.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from trainer.runtime.cache import cache_dir
from trainer.data.encoding import Example

# The modules whose code decides the examples: editing any of them invalidates the cache.
CODE_FILES = ("formats.py", "encoding.py", "cache.py", "leakage.py")
# What a cache file holds; a file missing one (written by older code) is a miss.
ARRAYS = ("input_ids", "labels", "lengths", "row_ids", "questions")


def cache_key(source_identity: str, tokenizer, settings: dict[str, Any]) -> str:
    parts = {"source": source_identity, "tokenizer": tokenizer_identity(tokenizer), "settings": settings,
             "code": code_version()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def tokenizer_identity(tokenizer) -> str:
    # A fast tokenizer serialises its whole pipeline (vocab, merges, normaliser, added tokens).
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id,
             getattr(tokenizer, "chat_template", None)]
    return hashlib.sha256((definition + json.dumps(extra, default=str)).encode()).hexdigest()


def code_version() -> str:
    here = Path(__file__).parent
    return hashlib.sha256(b"".join((here / name).read_bytes() for name in CODE_FILES)).hexdigest()[:16]


def path_for(key: str) -> Path:
    return cache_dir() / "tokenized" / f"{key}.safetensors"


def load(key: str) -> tuple[list[Example], dict[str, Any]] | None:
    """The cached examples and their info, or None when absent or unreadable (then rebuilt)."""
    path = path_for(key)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="np") as handle:
            info = json.loads(handle.metadata()["info"])
            arrays = {name: handle.get_tensor(name) for name in ARRAYS}
    except Exception:  # a corrupt or foreign file is a miss, not a crash
        return None
    bounds = np.cumsum(arrays["lengths"])[:-1]
    input_ids, labels = np.split(arrays["input_ids"], bounds), np.split(arrays["labels"], bounds)
    examples = [Example(int(row_id), ids, row_labels, int(question))
                for row_id, ids, row_labels, question in zip(arrays["row_ids"], input_ids, labels,
                                                             arrays["questions"])]
    return examples, info


def save(key: str, examples: list[Example], info: dict[str, Any]) -> Path | None:
    """Write the cache file; a cache that cannot be written costs time, not the run."""
    path = path_for(key)
    arrays = {
        "input_ids": _joined([e.input_ids for e in examples]),
        "labels": _joined([e.labels for e in examples]),
        "lengths": np.array([len(e.input_ids) for e in examples], dtype=np.int64),
        "row_ids": np.array([e.row_id for e in examples], dtype=np.int64),
        "questions": np.array([e.question for e in examples], dtype=np.int64),
    }
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(arrays, str(temporary), metadata={"info": json.dumps(info)})
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        print(f"warning: could not cache the tokenised data at {path}: {error}", flush=True)
        return None
    return path


def _joined(sequences: list) -> np.ndarray:
    """The examples' int32 token arrays end to end."""
    return np.concatenate([np.frombuffer(s, dtype=np.int32) for s in sequences if len(s)] + [np.zeros(0, np.int32)])
