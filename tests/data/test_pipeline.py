"""The data pipeline: formats, masks, BOS/EOS, bad rows, length policy, label checks, cache, batch order.

Real data and the Llama 2 tokenizer come from ../shared and are skipped when it is absent."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from trainer.data import pipeline
from trainer.config import DataConfig, DataSource
from trainer.data.examples import IGNORE_INDEX, Example
from trainer.data.instruction_templates import render_prompt
from trainer.data.batching import BatchPlan, collate
from trainer.data.formats import DataError
from trainer.data.pipeline import build_datasets, read_rows
from trainer.data.stats import chat_rendered, check_labels
from conftest import shared_llama2

SHARED = Path(__file__).resolve().parents[3] / "shared"
REAL = SHARED / "data"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
ROWS = [{"instruction": "Add the two numbers.", "input": "7 + 12", "output": "19"},
        {"instruction": "Reverse the word cat.", "input": "", "output": "tac"},
        {"instruction": "Write dog in uppercase.", "output": "DOG"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_llama2(tmp_path_factory.mktemp("llama2")))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def config(path, **overrides) -> DataConfig:
    return DataConfig(path=str(path), **{"eval_fraction": 0.0, "cache": False, "max_seq_len": 256, **overrides})


def trained_runs(example: Example) -> list[list[int]]:
    """The label ids of each contiguous trained stretch (the loss never predicts position 0)."""
    runs, current = [], []
    for label in [*example.labels[1:], IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs, current = runs + [current], []
    return runs


# ------------------------------------------------------------------------------ masks, BOS and EOS


def test_prompt_is_masked_and_the_response_with_eos_is_trained(tokenizer, tmp_path):
    train, _, _ = build_datasets(config(write_jsonl(tmp_path / "d.jsonl", ROWS)), tokenizer, seed=0)
    assert [e.row_id for e in train] == [0, 1, 2]
    for example, row in zip(train, ROWS):
        prompt = tokenizer(render_prompt({"input": "", **row}, "alpaca"), add_special_tokens=False)["input_ids"]
        response = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
        assert list(example.input_ids) == [tokenizer.bos_token_id] + prompt + response + [tokenizer.eos_token_id]
        assert list(example.labels) == [IGNORE_INDEX] * (1 + len(prompt)) + response + [tokenizer.eos_token_id]
    batch = collate(train, tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["row_ids"].tolist() == [0, 1, 2]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_llama2_encodings_bos_once_eos_trained_and_the_boundary_exact(llama2, tmp_path):
    rows = read_rows(str(REAL / "gsm8k_train.json"), max_rows=50)
    rows.append({"instruction": "Quote the tag.", "input": "", "output": "Use <s> and </s> for strikethrough."})
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    train, _, stats = build_datasets(config(path, max_seq_len=512), llama2, seed=0)
    assert len(train) == len(rows) and stats["notes"][0].startswith("pad token was missing")
    for example, row in zip(train, rows):
        ids, labels = list(example.input_ids), list(example.labels)
        assert ids[0] == 1 and ids.count(1) == 1, "BOS once, at the start (the '<s>' in the text stays text)"
        assert ids[-1] == labels[-1] == 2 and ids.count(2) == 1, "EOS once, at the end, trained"
        first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        assert all(label == IGNORE_INDEX for label in labels[:first])
        assert labels[first:] == ids[first:]
        assert llama2.decode(ids[1:first]) == render_prompt(row, "alpaca")
        # Row text is tokenised literally: a "<s>" in an answer is text, not a second BOS.
        assert ids[first:-1] == llama2(row["output"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert llama2.decode(ids[first:-1]) == row["output"]


def test_real_datasets_give_their_row_counts_and_clean_masks(llama2):
    names = ("gsm8k_train.json", "gpteacher_toolformer.json", "alpaca_seed_tasks.jsonl")
    # Every row read and validated; the seed tasks have one instance each.
    assert [len(read_rows(str(REAL / name))) for name in names] == [7473, 7673, 175]
    # Masks on the first 2,500 rows of each: tokenising all ~15k takes ~6 s on a quiet 2-core machine.
    mixture = [DataSource(str(REAL / name)) for name in names]
    train, held_out, stats = build_datasets(DataConfig(mixture=mixture, max_seq_len=1024, max_eval_rows=10_000,
                                                       max_rows=2500, cache=False), llama2, seed=1)
    assert [s["rows"] for s in stats["datasets"]] == [2500, 2500, 175]
    assert [s["format"] for s in stats["datasets"]] == ["alpaca", "alpaca", "instances"]
    for summary in stats["datasets"]:
        assert summary["examples"] == summary["rows"] - sum(summary["outcomes"].values()) + \
            summary["outcomes"].get("truncated", 0)
        assert summary["train"] + summary["leaked"] + summary["eval"] == summary["examples"]
        assert 0.05 < summary["trained_fraction"] < 0.9 and summary["max_tokens"] <= 1024
    assert len(train) + stats["leaked"] + len(held_out) == sum(s["examples"] for s in stats["datasets"]) > 5_000
    check_labels([*train, *held_out], llama2, describe=str)  # BOS once, trained EOS last, a trained token each
    assert all(e.labels[1] == IGNORE_INDEX for e in train), "the prompt is never trained"


# ------------------------------------------------------------------------------ bad input


BAD_ROWS = {
    "missing field": ({"instruction": "x"}, "row 2: field 'output' is missing", "skipped: missing output"),
    "not a string": ({"instruction": "x", "output": 3}, "row 2: field 'output' is int, not a string",
                     "skipped: output not a string"),
    "empty response": ({"instruction": "x", "output": "  "}, "row 2: field 'output' is empty", "skipped: empty output"),
    "malformed JSON": ('{"instruction": "x", "output": ', r"row 2 \(line 3\): not valid JSON", "skipped: invalid JSON"),
    "not an object": ([1, 2], "row 2: expected an object, got list", "skipped: not an object"),
}


@pytest.mark.parametrize("kind", BAD_ROWS)
def test_a_bad_row_names_file_row_and_problem_or_is_skipped_and_counted(kind, tokenizer, tmp_path):
    bad, message, reason = BAD_ROWS[kind]
    lines = [ROWS[0], bad, ROWS[1]]
    if kind == "malformed JSON":
        lines.insert(1, "")  # a blank line: the row number and the line number differ
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=f"{path}: {message}"):
        build_datasets(config(path), tokenizer, seed=0)
    train, _, stats = build_datasets(config(path, on_bad_row="skip"), tokenizer, seed=0)
    assert [e.row_id for e in train] == [0, 2]
    assert stats["skipped"] == 1 and stats["datasets"][0]["outcomes"] == {reason: 1}
    assert f"{reason}: 1" in str(stats)


def test_bad_instances_and_chat_rows_are_named(tokenizer, tmp_path):
    task = {"instruction": "Name a colour.", "instances": [{"input": "", "output": "red"}, {"input": "", "output": ""}]}
    path = write_jsonl(tmp_path / "tasks.jsonl", [task])
    with pytest.raises(DataError, match=r"row 1, instance 2: field 'output' is empty"):
        build_datasets(config(path), tokenizer, seed=0)
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=f"{chat}: row 1: no assistant message"):
        build_datasets(config(chat), tokenizer, seed=0)


def test_unreadable_files_and_unknown_columns_name_the_file_and_its_columns(tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"missing\.json: cannot read the data file"):
        build_datasets(config(tmp_path / "missing.json"), tokenizer, seed=0)
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match=r"binary\.jsonl: row 1: not UTF-8 text .*; re-save it as UTF-8, and no record "
                                        r"of the first 1 is an object"):
        build_datasets(config(binary), tokenizer, seed=0)
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "Say hi.", "response": "hi"}])
    with pytest.raises(DataError, match=r"qa\.jsonl: cannot tell the format from its columns \['prompt', 'response'\]"):
        build_datasets(config(path), tokenizer, seed=0)
    with pytest.raises(DataError, match=r"qa\.jsonl: data.columns .* no column \['answer'\]; the file has columns "
                                        r"\['prompt', 'response'\]"):
        build_datasets(config(path, columns={"prompt": "instruction", "answer": "output"}), tokenizer, seed=0)


def test_column_mapping_works_for_json_and_for_a_datasets_folder(tokenizer, tmp_path):
    import datasets

    rows = [{"prompt": "Say hi.", "response": "hi"}, {"prompt": "Say bye.", "response": "bye"}]
    columns = {"prompt": "instruction", "response": "output"}
    expected = [{"instruction": "Say hi.", "input": "", "output": "hi"},
                {"instruction": "Say bye.", "input": "", "output": "bye"}]
    assert read_rows(str(write_jsonl(tmp_path / "qa.jsonl", rows)), columns=columns) == expected
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert read_rows(str(tmp_path / "saved"), columns=columns) == expected
    train, _, stats = build_datasets(config(tmp_path / "saved", columns=columns, cache=True), tokenizer, seed=0)
    assert len(train) == 2 and stats["cache"] == "miss"


def test_nested_instances_give_one_example_per_instance(tokenizer, tmp_path):
    task = {"instruction": "Name a colour.",
            "instances": [{"input": "", "output": "red"}, {"input": "sky", "output": "blue"}]}
    path = write_jsonl(tmp_path / "tasks.jsonl", [task, {**task, "instances": [{"output": "green"}]}])
    train, _, stats = build_datasets(config(path), tokenizer, seed=0)
    assert stats["datasets"][0]["format"] == "instances" and stats["datasets"][0]["rows"] == 2
    assert [e.row_id for e in train] == [0, 0, 1], "instances keep the row id of their task"
    assert tokenizer.decode([t for t in train[1].labels if t != IGNORE_INDEX]).strip() == "blue</s>"


# ------------------------------------------------------------------------------ templates and chat


def test_chat_rows_train_only_on_assistant_turns(tiny_base, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    tokenizer.chat_template = CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse cat."},
                {"role": "assistant", "content": "tac"}, {"role": "user", "content": "And dog?"},
                {"role": "assistant", "content": "god"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    (example,), _, stats = build_datasets(config(path), tokenizer, seed=0)
    assert stats["datasets"][0]["format"] == "chat" and "the tokenizer's" in " ".join(stats["notes"])
    assert chat_rendered(stats)  # meta.json says so: chat writes conversations with the chat template
    eos = tokenizer.eos_token_id
    piece = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    # Token by token: the template's text in pieces, trained exactly on each reply and its EOS.
    expected = [(tokenizer.bos_token_id, False)]
    for text, trained in [("<|system|>Be brief.<|user|>Reverse cat.<|assistant|>", False), ("tac", True),
                          ("<|user|>And dog?<|assistant|>", False), ("god", True)]:
        expected += [(token, trained) for token in piece(text)] + ([(eos, True)] if trained else [])
    assert list(example.input_ids) == [token for token, _ in expected]
    assert list(example.labels) == [token if trained else IGNORE_INDEX for token, trained in expected]
    assert [tokenizer.decode(run) for run in trained_runs(example)] == ["tac</s>", "god</s>"]

    # A template that writes BOS itself: BOS stays single.
    tokenizer.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    (example,), _, _ = build_datasets(config(path), tokenizer, seed=0)
    assert example.input_ids[0] == tokenizer.bos_token_id and example.input_ids.count(tokenizer.bos_token_id) == 1


def test_sharegpt_conversations_read_as_the_same_messages(tiny_base, tmp_path):
    """axolotl's and LLaMA-Factory's sharegpt: `conversations` of {from: human/gpt/system, value} turns
    give the examples their messages would, with no unread-column note; an unknown speaker is named."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    tokenizer.chat_template = CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse cat."},
                {"role": "assistant", "content": "tac"}, {"role": "user", "content": "And dog?"},
                {"role": "assistant", "content": "god"}]
    speaker = {"system": "system", "user": "human", "assistant": "gpt"}
    turns = [{"from": speaker[m["role"]], "value": m["content"]} for m in messages]
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [{"id": "a1", "conversations": turns}])
    (expected,), _, _ = build_datasets(config(chat), tokenizer, seed=0)
    for format in ("auto", "chat"):
        (example,), _, stats = build_datasets(config(sharegpt, format=format), tokenizer, seed=0)
        assert stats["datasets"][0]["format"] == "chat" and not any("no field reads" in n for n in stats["notes"])
        assert list(example.input_ids) == list(expected.input_ids) and list(example.labels) == list(expected.labels)
    both = write_jsonl(tmp_path / "both.jsonl", [{"messages": messages, "conversations": turns[:3]}])
    (example,), _, stats = build_datasets(config(both), tokenizer, seed=0)  # messages read, conversations said unread
    assert list(example.input_ids) == list(expected.input_ids)
    assert any("'conversations' (a value in 1 row) is in the data but no field reads it" in n for n in stats["notes"])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": [{"from": "human", "value": "Hi"},
                                                                  {"from": "bot", "value": "Hello"}]}])
    with pytest.raises(DataError, match=r"bad.jsonl: row 1: message 2: 'from' is 'bot'; ShareGPT turns are from "
                                        r"human, user, gpt, assistant, system"):
        build_datasets(config(bad), tokenizer, seed=0)


def test_without_a_chat_template_the_builtin_one_is_used_and_said(tokenizer, tmp_path):
    assert tokenizer.chat_template is None
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:1])
    (example,), _, stats = build_datasets(config(path, template="chat"), tokenizer, seed=0)
    assert any("built-in" in note for note in stats["notes"]) and "built-in" in str(stats)
    assert tokenizer.decode(trained_runs(example)[0]) == "19</s>"
    assert "<|user|>\nAdd the two numbers.\n\n7 + 12\n<|assistant|>\n" in tokenizer.decode(example.input_ids)


def test_custom_template_string(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Say {x}.", "input": "now", "output": "x"}])
    (example,), _, stats = build_datasets(config(path, template="Q: {instruction} [{input}]\nA:"), tokenizer, seed=0)
    assert stats["template"] == "custom"
    first = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    assert tokenizer.decode(example.input_ids[1:first]) == "Q: Say {x}. [now]\nA:"


# ------------------------------------------------------------------------------ length policy


def test_too_long_rows_truncate_the_prompt_drop_or_stop(tokenizer, tmp_path):
    long_row = {"instruction": "Reverse the word. " * 40, "input": "", "output": "tac"}
    huge_answer = {"instruction": "Repeat.", "input": "", "output": "cat " * 200}
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], long_row, huge_answer])
    train, _, stats = build_datasets(config(path, max_seq_len=64), tokenizer, seed=0)
    assert [e.row_id for e in train] == [0, 1]
    cut = train[1]
    assert len(cut.input_ids) == 64 and cut.input_ids[0] == tokenizer.bos_token_id
    response = tokenizer("tac", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert list(cut.input_ids[-len(response):]) == response == [t for t in cut.labels if t != IGNORE_INDEX]
    assert stats["datasets"][0]["outcomes"] == {"truncated": 1, "dropped: response alone too long": 1}
    assert stats["dropped"] == 1

    train, _, stats = build_datasets(config(path, max_seq_len=64, on_too_long="drop"), tokenizer, seed=0)
    assert [e.row_id for e in train] == [0] and stats["dropped"] == 2
    with pytest.raises(DataError, match=r"d\.jsonl: row 2: \d+ tokens, over data.max_seq_len=64"):
        build_datasets(config(path, max_seq_len=64, on_too_long="error"), tokenizer, seed=0)


# ------------------------------------------------------------------------------ label checks


def test_label_checks_stop_on_pad_eos_missing_eos_and_untrained_rows(tokenizer, tiny_base):
    from transformers import AutoTokenizer

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    good = Example(0, [bos, 300, 301, eos], [IGNORE_INDEX, IGNORE_INDEX, 301, eos])
    check_labels([good], tokenizer, describe=lambda row: f"row {row}")
    no_eos = Example(3, [bos, 300, 301], [IGNORE_INDEX, IGNORE_INDEX, 301])
    with pytest.raises(DataError, match="EOS .* is never a trained label"):
        check_labels([no_eos], tokenizer, describe=lambda row: f"row {row}")
    with pytest.raises(DataError, match="row 3: does not end in a trained EOS"):
        check_labels([good, no_eos], tokenizer, describe=lambda row: f"row {row}")
    untrained = Example(5, [bos, 300, eos], [IGNORE_INDEX] * 3)
    with pytest.raises(DataError, match="row 5: no trained token"):
        check_labels([good, untrained], tokenizer, describe=lambda row: f"row {row}")
    doubled = Example(7, [bos, bos, 300, eos], [IGNORE_INDEX, IGNORE_INDEX, 300, eos])
    with pytest.raises(DataError, match="row 7: does not start with exactly one BOS"):
        check_labels([good, doubled], tokenizer, describe=lambda row: f"row {row}")

    pad_is_eos = AutoTokenizer.from_pretrained(tiny_base)
    pad_is_eos.pad_token = pad_is_eos.eos_token
    with pytest.raises(DataError, match="pad token is EOS"):
        check_labels([good], pad_is_eos, describe=str)
    pad_is_eos.unk_token = None  # nothing to pad with instead
    with pytest.raises(DataError, match="pad token is EOS .* no unk token"):
        build_datasets(DataConfig(max_rows=5), pad_is_eos, seed=0)


# ------------------------------------------------------------------------------ mixture and cache


def test_mixture_weights_are_deterministic_and_seeded(tokenizer, tmp_path):
    # Distinct questions: a training row repeating a held-out one would be dropped (tests/data/test_leakage.py).
    first = write_jsonl(tmp_path / "a.jsonl", [{**ROWS[0], "input": f"{i} + 12", "output": str(i)} for i in range(40)])
    second = write_jsonl(tmp_path / "b.jsonl", [{**ROWS[1], "input": f"w{i}", "output": f"w{i}"} for i in range(10)])
    mixed = DataConfig(mixture=[DataSource(str(first), weight=0.5), DataSource(str(second), weight=2.0)],
                       eval_fraction=0.1, cache=False)
    train, held_out, stats = build_datasets(mixed, tokenizer, seed=3)
    assert [(s["train"], s["eval"]) for s in stats["datasets"]] == [(18, 4), (18, 1)]
    assert sorted({e.row_id for e in train if e.row_id >= 40}) == sorted(set(range(40, 50)) -
                                                                       {e.row_id for e in held_out})
    again, _, _ = build_datasets(mixed, tokenizer, seed=3)
    other, _, _ = build_datasets(mixed, tokenizer, seed=4)
    assert [e.row_id for e in again] == [e.row_id for e in train] != [e.row_id for e in other]
    assert not {e.row_id for e in train} & {e.row_id for e in held_out}


def test_the_second_load_hits_the_cache(tokenizer, monkeypatch, tmp_path):
    recipe_data = DataConfig(max_seq_len=160, max_eval_rows=128)  # the built-in tasks, as the tiny recipe
    train, held_out, stats = build_datasets(recipe_data, tokenizer, seed=42)
    assert stats["cache"] == "miss" and stats["datasets"][0]["rows"] == 3000

    def must_not_tokenize(*args, **kwargs):
        raise AssertionError("tokenised again despite a cached copy")

    monkeypatch.setattr(pipeline, "build_store", must_not_tokenize)
    cached_train, cached_held_out, cached_stats = build_datasets(recipe_data, tokenizer, seed=42)
    assert cached_stats["cache"] == "hit" and "cache hit" in str(cached_stats)
    assert list(cached_train) == list(train) and list(cached_held_out) == list(held_out)
    assert {k: v for k, v in cached_stats.items() if k != "cache" and k != "datasets"} == \
        {k: v for k, v in stats.items() if k != "cache" and k != "datasets"}
    assert not list((Path(os.environ["QLORA_TRAINER_CACHE"]) / "tokenized").glob(".*.tmp"))
    # Anything the examples depend on changes the key: the length limit, the file.
    with pytest.raises(AssertionError, match="tokenised again"):
        build_datasets(DataConfig(max_seq_len=150, max_eval_rows=128), tokenizer, seed=42)
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    monkeypatch.undo()
    build_datasets(config(path, cache=True), tokenizer, seed=0)
    write_jsonl(path, ROWS[:2])
    _, _, changed = build_datasets(config(path, cache=True), tokenizer, seed=0)
    assert changed["cache"] == "miss" and changed["train_examples"] == 2


# ------------------------------------------------------------------------------ batch order


def test_batch_plan_is_deterministic_and_ranks_share_the_global_batch():
    plan, same = BatchPlan(10, global_batch=4, seed=7), BatchPlan(10, global_batch=4, seed=7)
    assert [plan.indices(step) for step in range(6)] == [same.indices(step) for step in range(6)]
    assert [plan.indices(step) for step in range(6)] != [BatchPlan(10, 4, seed=8).indices(step) for step in range(6)]
    stream = [i for step in range(5) for i in plan.indices(step)]
    assert sorted(stream[:10]) == sorted(stream[10:20]) == list(range(10)), "each epoch is a permutation"
    for step in range(6):
        one_rank = [i for batch in plan.rank_micro_batches(step, 0, 1, micro_batch=2) for i in batch]
        two_ranks = [i for rank in (0, 1) for batch in plan.rank_micro_batches(step, rank, 2, micro_batch=2)
                     for i in batch]
        assert one_rank == two_ranks == plan.indices(step)
    with pytest.raises(DataError):
        BatchPlan(0, 4, seed=0)


def test_a_held_out_fraction_that_rounds_to_no_row_is_noted(tokenizer, tmp_path):
    rows = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(20)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    _, held_out, stats = build_datasets(config(path, eval_fraction=0.001), tokenizer, seed=0)
    assert len(held_out) == 0
    assert any("data.eval_fraction=0.001 of these rows rounds to none" in note for note in stats["notes"])
    _, held_out, stats = build_datasets(config(path, eval_fraction=0.2), tokenizer, seed=0)
    assert len(held_out) and not any(note.startswith("no held-out example") for note in stats["notes"])
    _, _, stats = build_datasets(config(path, eval_fraction=0.2, max_eval_rows=0), tokenizer, seed=0)
    assert any("(data.max_eval_rows=0)" in note for note in stats["notes"])
    _, _, stats = build_datasets(config(path), tokenizer, seed=0)  # eval_fraction=0: none asked for
    assert not any(note.startswith("no held-out example") for note in stats["notes"])
