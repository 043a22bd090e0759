"""A base model's fingerprint: a short hash that changes when the base does, written into every
checkpoint's meta.json so an adapter is never applied to a base it was not trained on."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from trainer import builtin
from trainer.model.base import ModelLoadError

# Fields a re-save changes without changing the model.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash")
_SAMPLE_BYTES = 64  # read from the start and the middle of every tensor


def base_fingerprint(base_dir_or_id: str, revision: str | None = None) -> str:
    """A short hash that changes when the base does: config.json (minus version fields), every
    tensor's name, dtype and shape from the safetensors headers, and 2 x 64 bytes sampled from
    each tensor (so two fine-tunes of one architecture differ). Reads a few KiB per file, never
    the weights; independent of how the weights are split into shards."""
    directory = _local_directory(base_dir_or_id, revision)
    config = json.loads((directory / "config.json").read_text())
    for key in _VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with open(path, "rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_size))
            data_start = 8 + header_size
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                sample = b""
                for offset in (begin, begin + (end - begin) // 2):
                    handle.seek(data_start + offset)
                    sample += handle.read(min(_SAMPLE_BYTES, end - offset))
                tensors[name] = [info["dtype"], info["shape"], hashlib.sha256(sample).hexdigest()]
    digest.update(json.dumps(sorted(tensors.items())).encode())
    return "sha256:" + digest.hexdigest()[:16]


def _local_directory(base_dir_or_id: str, revision: str | None) -> Path:
    local = Path(builtin.resolve(base_dir_or_id))
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:  # a hub id: the copy in the local cache, never a download
        found = snapshot_download(str(local), revision=revision, local_files_only=True,
                                  allow_patterns=["config.json", "*.safetensors"])
    except Exception as error:  # huggingface_hub raises several types for "not in the cache"
        raise ModelLoadError(f"cannot fingerprint the base {base_dir_or_id!r}: not a local directory and not "
                             f"in the local hub cache ({type(error).__name__})") from None
    return Path(found)
