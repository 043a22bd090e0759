"""A base model's fingerprint: a short hash that changes when the base does, written into every
checkpoint's meta.json so an adapter is never applied to a base it was not trained on."""
from __future__ import annotations

import collections
import hashlib
import io
import json
import math
import pickle
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer import builtin
from trainer.model.base import ModelLoadError

# Fields a re-save changes without changing the model.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash")
_SAMPLE_BYTES = 64  # read from the start and the middle of every tensor
# torch's dtypes by their safetensors names, so a pytorch_model.bin and its conversion to
# model.safetensors (the same tensors) have one fingerprint.
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
                       torch.float8_e5m2: "F8_E5M2"}
# The storage classes a torch.save pickle names for the tensors of a state dict (float8 ones excepted).
_PICKLED_STORAGES = {"DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
                     "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                     "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                     "BoolStorage": torch.bool}


def base_fingerprint(base_dir_or_id: str, revision: str | None = None) -> str:
    """A short hash that changes when the base does: config.json (minus version fields), every
    tensor's name, dtype and shape, and 2 x 64 bytes sampled from each tensor (so two fine-tunes of
    one architecture differ), over the weight files transformers loads (_weight_files). Reads a few KiB
    per file, never the weights; independent of how the weights are split into shards."""
    directory = _local_directory(base_dir_or_id, revision)
    config = json.loads((directory / "config.json").read_text())
    tensors = {}
    for path in _weight_files(directory, config):
        tensors.update(_safetensors_entries(path) if path.name.endswith(".safetensors") else _torch_entries(path))
    digest = _config_digest(config)
    digest.update(json.dumps(sorted(tensors.items())).encode())
    return "sha256:" + digest.hexdigest()[:16]


def config_only_fingerprint(base_dir_or_id: str, revision: str | None = None) -> str:
    """What base_fingerprint gave before it read pytorch_model.bin files: config.json alone, the value
    checkpoints trained on a .bin base then recorded. A recorded fingerprint equal to this one
    checked no weights."""
    config = json.loads((_local_directory(base_dir_or_id, revision) / "config.json").read_text())
    digest = _config_digest(config)
    digest.update(json.dumps([]).encode())
    return "sha256:" + digest.hexdigest()[:16]


def _weight_files(directory: Path, config: dict) -> list[Path]:
    """The files from_pretrained loads from `directory`, in its order of preference: the one config.json
    names in transformers_weights, else model.safetensors, the shards model.safetensors.index.json
    names, pytorch_model.bin, the shards of pytorch_model.bin.index.json. Files beside them that it
    never reads (Mistral's consolidated.safetensors, a pytorch_model.bin kept beside model.safetensors)
    do not count."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    explicit = config.get("transformers_weights")
    names = [explicit] if explicit else [SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME]
    for name in names:
        path = directory / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        shards = [directory / shard for shard in sorted(set(json.loads(path.read_text())["weight_map"].values()))]
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise ModelLoadError(f"cannot fingerprint the base in {directory}: {name} names shards that are not "
                                 f"there ({', '.join(missing)}); finish the download")
        return shards
    # config.json alone would give two models of one architecture the same fingerprint.
    raise ModelLoadError(f"cannot fingerprint the base in {directory}: it has none of the weight files "
                         f"transformers loads ({', '.join(names)})")


def _config_digest(config: dict):
    config = {key: value for key, value in config.items() if key not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode())


def _entry(dtype: str, shape: list[int], size: int, read: Callable[[int, int], bytes]) -> list:
    """[dtype, shape, hash of 64 bytes from the start and 64 from the middle] of a tensor of `size`
    bytes; read(offset, count) returns its bytes from offset."""
    sample = b"".join(read(offset, min(_SAMPLE_BYTES, size - offset)) for offset in (0, size // 2))
    return [dtype, shape, hashlib.sha256(sample).hexdigest()]


def _safetensors_entries(path: Path) -> dict[str, list]:
    with open(path, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]

            def read(offset: int, count: int, begin: int = begin) -> bytes:
                handle.seek(8 + header_size + begin + offset)
                return handle.read(count)

            entries[name] = _entry(info["dtype"], info["shape"], end - begin, read)
    return entries


def _torch_entries(path: Path) -> dict[str, list]:
    """As for safetensors, for a torch.save file: its zip archive says where each tensor's bytes are, and
    the samples are read from there. A file laid out otherwise (torch's format before 1.6, tensors that
    are not plain contiguous ones) is loaded by torch instead."""
    try:
        return _zip_entries(path)
    except (zipfile.BadZipFile, pickle.UnpicklingError):
        return _loaded_entries(path)


def _zip_entries(path: Path) -> dict[str, list]:
    with zipfile.ZipFile(path) as archive, open(path, "rb") as handle:
        pickled = next((name for name in archive.namelist() if name.endswith("data.pkl")), None)
        if pickled is None:
            raise zipfile.BadZipFile(f"{path} has no data.pkl")
        records = pickled.removesuffix("data.pkl") + "data/"
        layout = _StateDictLayout(io.BytesIO(archive.read(pickled))).load()
        entries = {}
        for name, tensor in layout.items():
            start = _record_start(archive, handle, records + tensor.record) + tensor.start

            def read(offset: int, count: int, start: int = start) -> bytes:
                handle.seek(start + offset)
                return handle.read(count)

            entries[name] = _entry(_SAFETENSORS_DTYPES[tensor.dtype], tensor.shape, tensor.size, read)
    return entries


def _loaded_entries(path: Path) -> dict[str, list]:
    """Memory-mapped where torch can (a zip archive); an older file is read whole. Every touched page
    is read with the kernel's read-ahead around it, hence _zip_entries first."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    entries = {}
    for name, tensor in state.items():
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)

        def read(offset: int, count: int, data: torch.Tensor = data) -> bytes:
            return data[offset:offset + count].numpy().tobytes()

        entries[name] = _entry(_SAFETENSORS_DTYPES.get(tensor.dtype, str(tensor.dtype)), list(tensor.shape),
                               data.numel(), read)
    return entries


@dataclass
class _StoredTensor:
    """Where a torch.save zip keeps one tensor's bytes: in its storage's record, from `start` on."""

    record: str
    dtype: torch.dtype
    shape: list[int]
    start: int
    size: int


class _StateDictLayout(pickle.Unpickler):
    """A torch.save zip's data.pkl read into {name: _StoredTensor}, never the tensors' bytes. It builds
    what a state dict of plain contiguous tensors pickles and nothing else: anything more (a
    transposed view, a float8 tensor, any other class) raises UnpicklingError."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _stored_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda tensor, *_: tensor
        if module == "torch" and name in _PICKLED_STORAGES:
            return _PICKLED_STORAGES[name]
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a plain state dict")

    def persistent_load(self, saved_id: tuple) -> tuple[str, torch.dtype]:
        _, dtype, record, _, _ = saved_id  # ("storage", the storage's dtype, its record, device, elements)
        return record, dtype


def _stored_tensor(storage: tuple[str, torch.dtype], offset: int, shape: tuple, stride: tuple,
                   *_) -> _StoredTensor:
    record, dtype = storage
    expected = 1
    for size, step in reversed(list(zip(shape, stride))):
        if size != 1 and step != expected:
            raise pickle.UnpicklingError("a non-contiguous tensor")
        expected *= size
    return _StoredTensor(record, dtype, list(shape), offset * dtype.itemsize, math.prod(shape) * dtype.itemsize)


def _record_start(archive: zipfile.ZipFile, handle, name: str) -> int:
    """Where a zip record's bytes begin in the file: after its local header (torch never compresses)."""
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        raise zipfile.BadZipFile(f"{name} is compressed")
    handle.seek(info.header_offset + 26)
    name_length, extra_length = struct.unpack("<HH", handle.read(4))
    return info.header_offset + 30 + name_length + extra_length


def _local_directory(base_dir_or_id: str, revision: str | None) -> Path:
    local = Path(builtin.resolve(base_dir_or_id))
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:  # a hub id: the copy in the local cache, never a download; _weight_files picks from it
        found = snapshot_download(str(local), revision=revision, local_files_only=True, allow_patterns=["config.json"])
    except Exception as error:  # huggingface_hub raises several types for "not in the cache"
        raise ModelLoadError(f"cannot fingerprint the base {base_dir_or_id!r}: not a local directory and not "
                             f"in the local hub cache ({type(error).__name__})") from None
    return Path(found)
