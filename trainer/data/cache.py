"""Where tokenised datasets live on disk, so a second run (and every rank after the first) skips
reading and tokenising, and the ranks of a node map one copy.

A dataset's store (trainer/data/store.py) is a directory named by a key that covers everything the
examples depend on: the source's identity (path, size and mtime; a `datasets` fingerprint; or, for a
hub dataset streamed, its id and split, as nothing else is known before it is read), the tokenizer
(a hash of its full definition), the data settings that shape examples, and the code that makes
them. With data.cache off, the store is still how examples are held: it is written to
a directory of its own, which is deleted once mapped (the maps keep the files until the process
ends).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from trainer.data.store import INFO, Store, UnreadableStore, discard
from trainer.runtime.cache import cache_dir

# The modules whose code decides the examples: editing any of them invalidates the cache.
CODE_FILES = ("sources.py", "formats.py", "encoding.py", "examples.py", "instruction_templates.py",
              "chat_templates.py", "tokenizer_checks.py", "cache.py", "leakage.py", "store.py", "building.py")


def cache_key(source_identity: str, tokenizer, settings: dict[str, Any]) -> str:
    parts = {"source": source_identity, "tokenizer": tokenizer_identity(tokenizer), "settings": settings,
             "code": code_version()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def tokenizer_identity(tokenizer) -> str:
    # A fast tokenizer serialises its whole pipeline (vocab, merges, normaliser, added tokens), and its
    # padding and truncation settings too, which a call such as tokenizer(texts, padding=True) leaves
    # set until the next plain call: not part of what the examples are tokenised with, so left out.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
        definition = json.dumps(spec, sort_keys=True)
    else:
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id,
             getattr(tokenizer, "chat_template", None)]
    return hashlib.sha256((definition + json.dumps(extra, default=str)).encode()).hexdigest()


def code_version() -> str:
    return _CODE_VERSION


# Hashed once, when the data code is imported: a file edited (or upgraded) under a running process
# would otherwise key the store this process's older code builds as the new code's.
_CODE_VERSION = hashlib.sha256(b"".join((Path(__file__).parent / name).read_bytes()
                                        for name in CODE_FILES)).hexdigest()[:16]


def path_for(key: str) -> Path:
    return cache_dir() / "tokenized" / key


def load(key: str) -> Store | None:
    """The cached store, or None when absent or unreadable. An unreadable one (a copy cut short, a
    full disk) is removed, so that the store rebuilt after this miss can take its place."""
    path = path_for(key)
    if not (path / INFO).is_file():
        return None
    try:
        return Store(path)
    except UnreadableStore as error:
        print(f"warning: the cached tokenised data at {path} cannot be read ({error.reason}); "
              f"tokenising it again", flush=True)
    try:
        discard(path)
    except OSError:
        pass  # StoreWriter.finish tries again, and says which directory to delete if it cannot
    return None


def scratch_path() -> Path:
    """A fresh directory path for a store that is not cached: under the cache directory (on disk,
    where /tmp may be memory), or the system's temporary directory if that cannot be written."""
    for parent in (cache_dir() / "tokenized", Path(tempfile.gettempdir())):
        try:
            parent.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix=".uncached-", dir=parent)) / "store"
        except OSError:
            continue
    raise OSError("no writable directory for the tokenised data (the cache directory and the temporary one)")


def forget(store: Store) -> None:
    """Delete a scratch store's directory: its open maps keep the data until the process ends."""
    shutil.rmtree(store.path.parent, ignore_errors=True)
