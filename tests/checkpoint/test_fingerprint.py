"""The base fingerprint reads the weight files transformers loads, in its order of preference: the
same value as before for safetensors bases (so existing checkpoints still resume), pytorch_model.bin
bases told apart by their weights, files transformers never reads left out, and no fingerprint at all
from config.json alone."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer.checkpoint import fingerprint
from trainer.checkpoint.fingerprint import base_fingerprint, config_only_fingerprint
from trainer.model.base import ModelLoadError

COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def fingerprint_before_the_fix(directory: Path) -> str:
    """The fingerprint checkpoints recorded until now: every *.safetensors file in the directory."""
    config = json.loads((directory / "config.json").read_text())
    for key in ("transformers_version", "_name_or_path", "_commit_hash"):
        config.pop(key, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with open(path, "rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_size))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                sample = b""
                for offset in (begin, begin + (end - begin) // 2):
                    handle.seek(8 + header_size + offset)
                    sample += handle.read(min(64, end - offset))
                tensors[name] = [info["dtype"], info["shape"], hashlib.sha256(sample).hexdigest()]
    digest.update(json.dumps(sorted(tensors.items())).encode())
    return "sha256:" + digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def weights(tiny_base) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_base / "model.safetensors"))


def base_without_weights(directory: Path, source: Path) -> Path:
    directory.mkdir(parents=True)
    for name in COPIED:
        shutil.copy(source / name, directory / name)
    return directory


def save_shards(directory: Path, weights: dict[str, torch.Tensor], count: int, suffix: str) -> None:
    """`weights` split into `count` shards with their index, named as save_pretrained names them."""
    names = sorted(weights)
    stem, index_name = ("model", "model.safetensors.index.json") if suffix == "safetensors" else \
        ("pytorch_model", "pytorch_model.bin.index.json")
    weight_map = {}
    for number in range(count):
        shard = f"{stem}-{number + 1:05d}-of-{count:05d}.{suffix}"
        part = {name: weights[name].contiguous() for name in names[number::count]}
        if suffix == "safetensors":
            save_file(part, str(directory / shard), metadata={"format": "pt"})
        else:
            torch.save(part, directory / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (directory / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def perturbed(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**weights, "model.layers.0.self_attn.q_proj.weight": weights["model.layers.0.self_attn.q_proj.weight"] + 1}


# ------------------------------------------------------------------------------ the value checkpoints recorded


def test_a_single_safetensors_file_and_its_shards_keep_the_fingerprint_checkpoints_recorded(tmp_path, tiny_base,
                                                                                           weights):
    assert base_fingerprint(str(tiny_base)) == fingerprint_before_the_fix(tiny_base)
    sharded = base_without_weights(tmp_path / "sharded", tiny_base)
    save_shards(sharded, weights, 3, "safetensors")
    assert base_fingerprint(str(sharded)) == fingerprint_before_the_fix(sharded) == base_fingerprint(str(tiny_base))


# ------------------------------------------------------------------------------ pytorch_model.bin


def test_bin_bases_with_different_weights_have_different_fingerprints(tmp_path, tiny_base, weights):
    first = base_without_weights(tmp_path / "first", tiny_base)
    torch.save(weights, first / "pytorch_model.bin")
    second = base_without_weights(tmp_path / "second", tiny_base)
    torch.save(perturbed(weights), second / "pytorch_model.bin")
    assert base_fingerprint(str(first)) != base_fingerprint(str(second))
    # The same tensors as model.safetensors (what the hub's converter adds beside a .bin): one fingerprint.
    assert base_fingerprint(str(first)) == base_fingerprint(str(tiny_base))


def bin_and_safetensors(directory: Path, tensors: dict[str, torch.Tensor], zipped: bool = True
                        ) -> tuple[str, str]:
    """The fingerprints of `tensors` saved by torch.save and as model.safetensors (config.json: {})."""
    found = []
    for name in ("pytorch_model.bin", "model.safetensors"):
        base = directory / name.replace(".", "-")
        base.mkdir(parents=True)
        (base / "config.json").write_text("{}")
        if name.endswith(".bin"):
            torch.save(tensors, base / name, _use_new_zipfile_serialization=zipped)
        else:
            contiguous = {key: tensor.detach().clone(memory_format=torch.contiguous_format)
                          for key, tensor in tensors.items()}
            save_file(contiguous, str(base / name))
        found.append(base_fingerprint(str(base)))
    return found[0], found[1]


def test_every_kind_of_bin_file_fingerprints_as_its_safetensors_conversion(tmp_path, monkeypatch):
    plain = {"bf16": torch.randn(300, 4).bfloat16(), "parameter": torch.nn.Parameter(torch.randn(200)),
             "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 5), "column": torch.randn(5, 1),
             "mask": torch.rand(70) > 0.5}
    plain["view"] = plain["bf16"][7]  # shares the storage of "bf16", from an offset
    # All sampled where the zip stores them: torch.load would memory-map the file, and each touched page
    # is read with the kernel's read-ahead around it (most of a 7B base, on a cold cache).
    with monkeypatch.context() as patch:
        patch.setattr(fingerprint.torch, "load", None)
        first, second = bin_and_safetensors(tmp_path / "plain", plain)
        assert first == second
    # What that layout does not place (a transposed view, float8) and torch's pre-1.6 format: loaded.
    odd = {**plain, "transposed": torch.randn(40, 30).t(), "float8": torch.randn(100).to(torch.float8_e4m3fn)}
    first, second = bin_and_safetensors(tmp_path / "odd", odd)
    assert first == second
    first, second = bin_and_safetensors(tmp_path / "pre-1.6", plain, zipped=False)
    assert first == second


def test_bin_shards_named_by_their_index_fingerprint_as_one_file(tmp_path, tiny_base, weights):
    sharded = base_without_weights(tmp_path / "sharded", tiny_base)
    save_shards(sharded, weights, 3, "bin")
    assert base_fingerprint(str(sharded)) == base_fingerprint(str(tiny_base))
    changed = base_without_weights(tmp_path / "changed", tiny_base)
    save_shards(changed, perturbed(weights), 3, "bin")
    assert base_fingerprint(str(changed)) != base_fingerprint(str(sharded))


def test_config_only_fingerprint_is_what_a_bin_base_recorded_before(tmp_path, tiny_base, weights):
    # Checkpoints trained on a .bin base recorded config.json alone: a caller can recognise that value.
    base = base_without_weights(tmp_path / "bin", tiny_base)
    torch.save(weights, base / "pytorch_model.bin")
    assert config_only_fingerprint(str(base)) == fingerprint_before_the_fix(base) != base_fingerprint(str(base))

    # Such a checkpoint is not refused as another base: its weights were never checked, and eval says so.
    from _checkpoints import make_checkpoint, tiny_recipe
    from trainer.checkpoint.reading import AdapterMismatchError, check_adapter

    checkpoint = make_checkpoint(tmp_path / "run")
    meta = json.loads((checkpoint / "meta.json").read_text())
    recipe = tiny_recipe(f"model.name_or_path={base}")
    (checkpoint / "meta.json").write_text(json.dumps({**meta, "base_model": str(base),
                                                      "base_fingerprint": config_only_fingerprint(str(base))}))
    (warning,) = check_adapter(recipe, checkpoint)
    assert "config.json alone" in warning and "its weights cannot be checked" in warning
    (checkpoint / "meta.json").write_text(json.dumps({**meta, "base_model": str(base),
                                                      "base_fingerprint": "sha256:0123456789abcdef"}))
    with pytest.raises(AdapterMismatchError):
        check_adapter(recipe, checkpoint)


# ------------------------------------------------------------------------------ files transformers never loads


def test_files_transformers_never_loads_do_not_change_the_fingerprint(tmp_path, tiny_base, weights):
    # Mistral's layout: save_pretrained shards beside consolidated.safetensors (other names, other use).
    full_download = base_without_weights(tmp_path / "full", tiny_base)
    save_shards(full_download, weights, 2, "safetensors")
    save_file({name.replace("model.", ""): tensor for name, tensor in perturbed(weights).items()},
              str(full_download / "consolidated.safetensors"))
    assert base_fingerprint(str(full_download)) == base_fingerprint(str(tiny_base))
    # model.safetensors is preferred: a pytorch_model.bin beside it is never read.
    both = tmp_path / "both"
    shutil.copytree(tiny_base, both)
    torch.save(perturbed(weights), both / "pytorch_model.bin")
    assert base_fingerprint(str(both)) == base_fingerprint(str(tiny_base))


def test_config_json_can_name_the_weights_file(tmp_path, tiny_base, weights):
    base = base_without_weights(tmp_path / "named", tiny_base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "transformers_weights": "base.safetensors"}))
    save_file(weights, str(base / "base.safetensors"), metadata={"format": "pt"})
    named = base_fingerprint(str(base))
    save_file(perturbed(weights), str(base / "model.safetensors"), metadata={"format": "pt"})
    assert base_fingerprint(str(base)) == named  # not the file transformers would otherwise prefer
    save_file(perturbed(weights), str(base / "base.safetensors"), metadata={"format": "pt"})
    assert base_fingerprint(str(base)) != named


# ------------------------------------------------------------------------------ no weights: no fingerprint


def test_a_base_without_weights_or_with_missing_shards_is_not_fingerprinted(tmp_path, tiny_base, weights):
    bare = base_without_weights(tmp_path / "bare", tiny_base)
    with pytest.raises(ModelLoadError, match=r"none of the weight files transformers loads \(model.safetensors"):
        base_fingerprint(str(bare))
    save_shards(bare, weights, 2, "safetensors")
    (bare / "model-00002-of-00002.safetensors").unlink()  # an interrupted download
    with pytest.raises(ModelLoadError, match=r"names shards that are not there \(model-00002-of-00002.safetensors\)"):
        base_fingerprint(str(bare))


# ------------------------------------------------------------------------------ a hub id, from the local cache


def hub_snapshot(cache: Path, repo_id: str) -> Path:
    """The hub cache's layout for `repo_id` at main: refs/main names a commit, snapshots/<commit> holds
    the files downloaded so far."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_a_hub_id_is_fingerprinted_from_the_files_transformers_downloaded(tmp_path, tiny_base, weights,
                                                                           monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    # from_pretrained downloads the shards and their index, never consolidated.safetensors.
    sharded = base_without_weights(hub_snapshot(cache, "org/sharded"), tiny_base)
    save_shards(sharded, weights, 2, "safetensors")
    assert base_fingerprint("org/sharded") == base_fingerprint(str(tiny_base))
    old = base_without_weights(hub_snapshot(cache, "org/old"), tiny_base)
    torch.save(perturbed(weights), old / "pytorch_model.bin")
    assert base_fingerprint("org/old") not in (base_fingerprint(str(tiny_base)), config_only_fingerprint("org/old"))
    base_without_weights(hub_snapshot(cache, "org/config-only"), tiny_base)  # AutoConfig fetched config.json alone
    with pytest.raises(ModelLoadError, match="none of the weight files"):
        base_fingerprint("org/config-only")
    with pytest.raises(ModelLoadError, match="not in the local hub cache"):
        base_fingerprint("org/never-downloaded")
