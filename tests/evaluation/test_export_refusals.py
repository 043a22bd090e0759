"""What an export cannot write is refused before the base is loaded and merged (minutes on a 7B base),
with one line naming what to change: an out= it cannot write to, a tokenizer a GGUF file cannot hold."""
from __future__ import annotations

import json
import shutil

import pytest

import trainer.evaluation.export as export_module
from _checkpoints import tiny_recipe
from trainer.config import RecipeError
from trainer.evaluation.export import ExportOptions, export
from trainer.evaluation.gguf_mapping import GGUFExportError


@pytest.fixture
def never_loaded(monkeypatch):
    monkeypatch.setattr(export_module, "load_merged", lambda *a, **k: pytest.fail("the base was loaded"))


@pytest.mark.parametrize("out, message", [
    ("a_file", "is an existing file, and a merged model is written as a directory"),
    ("a_file/merged", "lies under .*a_file, an existing file"),
    ("a_file/model.gguf", "lies under .*a_file, an existing file"),
    ("a_dir.gguf", "is an existing directory, and a GGUF export is one file"),
])
def test_an_out_the_export_cannot_write_is_refused_before_loading(out, message, tmp_path, tiny_base, never_loaded):
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "a_dir.gguf").mkdir()
    with pytest.raises(RecipeError, match=message):
        export(tiny_recipe(), ExportOptions(adapter=str(tmp_path / "adapter"), out=str(tmp_path / out)))


@pytest.mark.parametrize("name", ["merged", "model.gguf"])
def test_an_out_this_user_cannot_write_is_refused_before_loading(name, unwritable_dir, tmp_path, tiny_base,
                                                                 never_loaded):
    out = unwritable_dir / name
    with pytest.raises(RecipeError, match=f"^out={out}: cannot write in .*; give an out= this user can write to"):
        export(tiny_recipe(), ExportOptions(adapter=str(tmp_path / "adapter"), out=str(out)))


@pytest.mark.parametrize("pre_tokenizer, message", [
    ({"type": "WhitespaceSplit"}, "neither byte-level BPE nor SentencePiece-style"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Punctuation", "behavior": "Isolated"},
                                            {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first",
                                             "split": False}]},
     "splits text with Punctuation besides Metaspace"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": False},
                                            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                             "use_regex": True}]},
     "none of those this export can name for llama.cpp"),
])
def test_a_tokenizer_gguf_cannot_hold_is_refused_before_loading(pre_tokenizer, message, tmp_path, tiny_base,
                                                                never_loaded):
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    spec = json.loads((base / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = pre_tokenizer
    (base / "tokenizer.json").write_text(json.dumps(spec))
    # No tokenizer_class: LlamaTokenizer would build its own pre-tokenizer over the file's.
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("tokenizer_class", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(GGUFExportError, match=message):
        export(tiny_recipe(f"model.name_or_path={base}"),
               ExportOptions(adapter=str(tmp_path / "adapter"), out=str(tmp_path / "model.gguf")))
