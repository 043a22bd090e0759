"""data/: each prepare script run as a command on small local files, its output read by the trainer's
reader and tokenised with the tiny base's tokenizer; bad rows named by file and row; the committed
examples equal what their script writes; the synthetic set is deterministic. The hub is not reached:
GSM8K's default source is ../shared's copy, skipped where that is absent."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SHARED
from trainer.config import DataConfig, DataSource
from trainer.data.pipeline import build_datasets, read_rows
from trainer.evaluation.scores import reference_number

EXAMPLES = ROOT / "data" / "examples"
SHARED_GSM8K = SHARED / "data" / "gsm8k_train.json"


def prepare(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"data/{name}/prepare.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


def tokenised(paths: list[Path], tokenizer) -> tuple[list, dict[str, dict]]:
    """Every row of the files as training examples, and each file's summary from the data table."""
    config = DataConfig(mixture=[DataSource(path=str(path)) for path in paths], eval_fraction=0.0, cache=False,
                        max_seq_len=256)
    train, held_out, stats = build_datasets(config, tokenizer, seed=0)
    assert held_out == []
    return train, {Path(summary["name"]).name: summary for summary in stats["datasets"]}


# ------------------------------------------------------------------------------ examples


def test_committed_examples_are_what_their_script_writes(tmp_path):
    result = prepare("examples", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    names = ["alpaca.json", "alpaca.jsonl", "chat.jsonl", "instances.jsonl"]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(names)
    for name in names:
        assert (tmp_path / name).read_bytes() == (EXAMPLES / name).read_bytes(), \
            f"data/examples/{name} differs from what data/examples/prepare.py writes: rerun it"
    ignored = subprocess.run(["git", "check-ignore", *[f"data/examples/{name}" for name in names]], cwd=ROOT,
                             capture_output=True, text=True)
    assert ignored.stdout == "", f"committed examples are git-ignored: {ignored.stdout}"


def test_every_example_format_is_read_and_tokenised(tokenizer):
    alpaca = read_rows(str(EXAMPLES / "alpaca.json"))
    assert len(alpaca) == 5 and all(set(row) == {"instruction", "input", "output"} for row in alpaca)
    assert alpaca[1] == {"instruction": "Translate the sentence into French.", "input": "The café opens at seven.",
                         "output": "Le café ouvre à sept heures."}
    assert sum(bool(row["input"]) for row in alpaca) == 3
    assert len(read_rows(str(EXAMPLES / "alpaca.jsonl"))) == 4
    chat = read_rows(str(EXAMPLES / "chat.jsonl"))
    assert [[m["role"] for m in row["messages"]] for row in chat] == [
        ["user", "assistant"], ["system", "user", "assistant"], ["user", "assistant", "user", "assistant"]]
    instances = read_rows(str(EXAMPLES / "instances.jsonl"))
    assert [row["instruction"] for row in instances] == ["Give the opposite of the word."] * 3 + \
        ["Is the number even or odd?"] * 2 + ["Suggest a quick breakfast without eggs."]
    assert [row["output"] for row in instances[:3]] == ["cold", "late", "full"]

    train, summaries = tokenised([EXAMPLES / name for name in
                                  ("alpaca.json", "alpaca.jsonl", "chat.jsonl", "instances.jsonl")], tokenizer)
    assert len(train) == 5 + 4 + 3 + 6
    assert {name: summary["format"] for name, summary in summaries.items()} == {
        "alpaca.json": "alpaca", "alpaca.jsonl": "alpaca", "chat.jsonl": "chat", "instances.jsonl": "instances"}
    assert {name: summary["rows"] for name, summary in summaries.items()} == {
        "alpaca.json": 5, "alpaca.jsonl": 4, "chat.jsonl": 3, "instances.jsonl": 3}
    assert all(any(label != -100 for label in example.labels) for example in train)


# ------------------------------------------------------------------------------ public sets, from local files


def test_gsm8k_dolly_and_alpaca_files_become_rows_the_trainer_trains_on(tmp_path, tokenizer):
    gsm8k = write_jsonl(tmp_path / "gsm8k_hub.jsonl", [
        {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
         "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nIn all 48+24 = <<48+24=72>>72.\n#### 72"},
        {"question": "Weng earns $12 an hour. How much for 50 minutes?",
         "answer": "12/60 = $<<12/60=0.2>>0.2 per minute.\n0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"},
        {"question": "A third question, past --max-rows.", "answer": "#### 3"}])
    dolly = write_jsonl(tmp_path / "dolly.jsonl", [
        {"instruction": "When did Virgin Australia start operating?", "context": "Virgin Australia commenced "
         "services on 31 August 2000.", "response": "On 31 August 2000.", "category": "closed_qa"},
        {"instruction": "Name a primary colour.", "context": "", "response": "Red.", "category": "open_qa"}])
    alpaca = tmp_path / "alpaca_data.json"
    alpaca.write_text(json.dumps([
        {"instruction": "Give a synonym of happy.", "input": "", "output": "Glad.", "text": "### the full prompt"},
        {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"},
        {"instruction": "Say hello.", "output": "Hello!"}]))

    result = prepare("gsm8k", "--source", str(gsm8k), "--out", str(tmp_path / "gsm8k.jsonl"), "--max-rows", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote 2 rows to {tmp_path / 'gsm8k.jsonl'} from {gsm8k}")
    assert lines(tmp_path / "gsm8k.jsonl")[0] == {
        "instruction": "Natalia sold 48 clips in April and half as many in May. How many in all?", "input": "",
        "output": "Natalia sold 48/2 = 24 clips in May.\nIn all 48+24 = 72.\n#### 72"}
    assert [str(reference_number(row["output"])) for row in lines(tmp_path / "gsm8k.jsonl")] == ["72", "10"]

    result = prepare("dolly", "--source", str(dolly), "--out", str(tmp_path / "dolly.jsonl"))
    assert result.returncode == 0, result.stderr
    assert lines(tmp_path / "dolly.jsonl") == [
        {"instruction": "When did Virgin Australia start operating?",
         "input": "Virgin Australia commenced services on 31 August 2000.", "output": "On 31 August 2000."},
        {"instruction": "Name a primary colour.", "input": "", "output": "Red."}]

    result = prepare("alpaca", "--source", str(alpaca), "--out", str(tmp_path / "alpaca.jsonl"))
    assert result.returncode == 0, result.stderr
    assert "wrote 3 rows" in result.stdout
    assert lines(tmp_path / "alpaca.jsonl")[0] == {"instruction": "Give a synonym of happy.", "input": "",
                                                   "output": "Glad."}
    assert lines(tmp_path / "alpaca.jsonl")[2]["input"] == ""

    outputs = [tmp_path / name for name in ("gsm8k.jsonl", "dolly.jsonl", "alpaca.jsonl")]
    assert [len(read_rows(str(path))) for path in outputs] == [2, 2, 3]
    train, summaries = tokenised(outputs, tokenizer)
    assert len(train) == 7 and all(summary["format"] == "alpaca" for summary in summaries.values())


def test_bad_rows_are_named_by_file_and_row_and_nothing_is_written(tmp_path):
    source = write_jsonl(tmp_path / "raw.jsonl", [
        {"instruction": "Fine.", "context": "", "response": "Yes."},
        {"instruction": "No answer.", "context": ""},
        "",
        '{"instruction": "cut off',
        {"instruction": "Blank answer.", "context": "", "response": "  "},
        {"instruction": 7, "context": "", "response": "a number for an instruction"},
        ["not", "an", "object"],
        {"instruction": "Also fine.", "context": "x", "response": "Yes."}])
    out = tmp_path / "dolly.jsonl"
    result = prepare("dolly", "--source", str(source), "--out", str(out))
    assert result.returncode == 1 and not out.exists() and list(tmp_path.iterdir()) == [source]
    assert result.stderr.splitlines() == [
        f"{source}: row 2: field 'response' is missing (row keys: ['context', 'instruction'])",
        f"{source}: row 3 (line 4): not valid JSON at column 17: Unterminated string starting",
        f"{source}: row 4 (line 5): field 'response' is empty",
        f"{source}: row 5 (line 6): field 'instruction' is int, not a string: 7",
        f"{source}: row 6 (line 7): expected an object, got list",
        f"error: 5 bad rows in {source}; nothing written (--skip-bad writes the others)"]

    kept = prepare("dolly", "--source", str(source), "--out", str(out), "--skip-bad")
    assert kept.returncode == 0, kept.stderr
    assert kept.stdout.strip() == f"wrote 2 rows to {out} from {source}; skipped 5 bad rows"
    assert kept.stderr.splitlines() == result.stderr.splitlines()[:-1]
    assert [row["instruction"] for row in read_rows(str(out))] == ["Fine.", "Also fine."]


def test_an_unreadable_source_is_one_message_and_exit_status_2(tmp_path):
    missing = prepare("alpaca", "--source", str(tmp_path / "nowhere.json"), "--out", str(tmp_path / "a.jsonl"))
    assert missing.returncode == 2 and missing.stderr.strip() == f"error: {tmp_path / 'nowhere.json'}: no such file"
    not_a_list = tmp_path / "object.json"
    not_a_list.write_text('{"instruction": "one object, not a list"}')
    result = prepare("alpaca", "--source", str(not_a_list), "--out", str(tmp_path / "a.jsonl"))
    assert result.returncode == 2 and "expected a JSON list of rows, got a dict" in result.stderr
    offline = prepare("dolly", "--source", "qlora-trainer-tests/no-such-dataset", "--out", str(tmp_path / "d.jsonl"))
    assert offline.returncode == 2
    assert offline.stderr.strip().splitlines()[-1].startswith(
        "error: qlora-trainer-tests/no-such-dataset: could not load split 'train' from the hub")
    assert not (tmp_path / "a.jsonl").exists() and not (tmp_path / "d.jsonl").exists()


def test_a_lone_surrogate_is_a_bad_row_that_skip_bad_leaves_out(tmp_path):
    # json.dumps writes the lone half of a UTF-16 pair as \ud83d, which json.loads reads back as it was.
    source = write_jsonl(tmp_path / "raw.jsonl", [{"instruction": "a", "output": "b"},
                                                  {"instruction": "Say hi \ud83d", "output": "hi \ud83d\ude00"},
                                                  {"instruction": "c", "output": "d"}])
    out = tmp_path / "alpaca.jsonl"
    result = prepare("alpaca", "--source", str(source), "--out", str(out))
    assert result.returncode == 1 and not out.exists()
    assert result.stderr.splitlines()[0] == (
        f"{source}: row 2: field 'instruction' holds an unpaired surrogate '\\ud83d' at character 8 (half of a "
        f"UTF-16 pair, such as an emoji cut in two): remove it or complete the pair in the file")
    kept = prepare("alpaca", "--source", str(source), "--out", str(out), "--skip-bad")
    assert kept.returncode == 0, kept.stderr
    assert [row["instruction"] for row in lines(out)] == ["a", "c"]


def test_a_converted_row_holding_a_lone_surrogate_is_a_bad_row(tmp_path):
    """A convert function that takes a field without `text` still cannot end the run with a traceback."""
    from data import prepare_common

    records = iter([("row 1", {"q": "fine"}), ("row 2", {"q": "half \ud83d"}), ("row 3", {"q": "also fine"})])
    out = tmp_path / "rows.jsonl"
    written, bad = prepare_common.write_rows(records, lambda record: {"instruction": record["q"], "output": "x"},
                                             "raw.jsonl", out, keep_going=True)
    assert written == 2 and [row["instruction"] for row in lines(out)] == ["fine", "also fine"]
    assert bad == ["raw.jsonl: row 2: holds an unpaired surrogate '\\ud83d' (half of a UTF-16 pair, such as an "
                   "emoji cut in two): remove it or complete the pair"]


def test_a_source_not_utf8_partway_names_the_row(tmp_path):
    source = tmp_path / "latin.jsonl"
    rows = [json.dumps({"instruction": f"q{number}", "output": "a"}).encode() for number in range(1, 3001)]
    source.write_bytes(b"\n".join([*rows, '{"instruction": "café", "output": "x"}'.encode("cp1252")]) + b"\n")
    result = prepare("alpaca", "--source", str(source), "--out", str(tmp_path / "a.jsonl"))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {source}: row 3001: not UTF-8 text (byte 0xe9 at character 21 of the "
                                     f"line; saved as Latin-1 or cp1252?); re-save the file as UTF-8")


def test_a_source_suffix_in_capitals_is_a_file(tmp_path):
    source = write_jsonl(tmp_path / "RAW.JSONL", [{"instruction": "a", "output": "b"}])
    out = tmp_path / "alpaca.jsonl"
    result = prepare("alpaca", "--source", str(source), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert lines(out) == [{"instruction": "a", "input": "", "output": "b"}]


def test_the_trainer_never_imports_data():
    import ast

    importers = []
    for path in sorted((ROOT / "trainer").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            importers += [f"{path.relative_to(ROOT)}: {name}" for name in names if name.split(".")[0] == "data"]
    assert importers == []


# ------------------------------------------------------------------------------ GSM8K's default source


def test_the_benchmark_takes_gsm8k_from_its_prepare_script_else_builtin_tasks(monkeypatch, tmp_path):
    from data.gsm8k import prepare as gsm8k_data
    from launch.benchmarks import job

    if SHARED_GSM8K.is_file():
        assert gsm8k_data.default_source() == job.default_data() == str(SHARED_GSM8K)
    monkeypatch.setattr(gsm8k_data, "SHARED_COPY", tmp_path / "absent.json")
    assert gsm8k_data.default_source() == "openai/gsm8k"
    assert job.default_data() == "builtin:tasks"


@pytest.mark.skipif(not SHARED_GSM8K.is_file(), reason="needs ../shared/data/gsm8k_train.json")
def test_shared_gsm8k_passes_through_unchanged_by_default(tmp_path):
    out = tmp_path / "gsm8k.jsonl"
    result = prepare("gsm8k", "--out", str(out), "--max-rows", "50")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote 50 rows to {out} from {SHARED_GSM8K}"
    assert lines(out) == json.loads(SHARED_GSM8K.read_text())[:50] == read_rows(str(out))


# ------------------------------------------------------------------------------ synthetic


def test_synthetic_rows_are_deterministic_varied_and_readable(tmp_path):
    paths = {name: tmp_path / f"{name}.jsonl" for name in ("a", "b", "other_seed", "shorter")}
    for name, rows, seed in (("a", 9000, 3), ("b", 9000, 3), ("other_seed", 9000, 4), ("shorter", 8500, 3)):
        result = prepare("synthetic", "--rows", str(rows), "--seed", str(seed), "--out", str(paths[name]))
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"wrote {rows} rows") and result.stdout.strip().endswith("rows/s")
    text = paths["a"].read_text()
    assert text == paths["b"].read_text() and text != paths["other_seed"].read_text()
    # 9,000 rows span two generation blocks; a shorter run is a prefix of a longer one.
    assert text.splitlines()[:8500] == paths["shorter"].read_text().splitlines()
    rows = read_rows(str(paths["a"]))
    assert len(rows) == len(text.splitlines()) == 9000
    lengths = sorted(len(line.encode()) for line in text.splitlines())
    assert 300 < sum(lengths) / len(lengths) < 500, sum(lengths) / len(lengths)
    assert lengths[len(lengths) // 100] < 150 and lengths[-len(lengths) // 100] > 1000 and lengths[-1] > 2500
    with_input = sum(bool(row["input"]) for row in rows) / len(rows)
    assert 0.5 < with_input < 0.9
    assert len({row["instruction"] for row in rows}) > 100


def test_a_csv_source_is_read_as_text_as_the_trainer_reads_it(tmp_path):
    # "NA" is an answer, not a missing value; a column of numbers is text (pandas would make them ints).
    source = tmp_path / "rows.csv"
    source.write_text("instruction,input,output\nExpand the abbreviation.,NA,North America\n"
                      "Add 2 and 2.,,4\nAdd 3 and 3.,,6\n")
    result = prepare("alpaca", "--source", str(source), "--out", str(tmp_path / "rows.jsonl"))
    assert result.returncode == 0, result.stderr
    rows = lines(tmp_path / "rows.jsonl")
    assert rows[0] == {"instruction": "Expand the abbreviation.", "input": "NA", "output": "North America"}
    assert [row["output"] for row in rows[1:]] == ["4", "6"]
    # A byte-order mark (as some editors save) is not part of row 1.
    (tmp_path / "bom.jsonl").write_text("\ufeff" + json.dumps(rows[0]) + "\n", encoding="utf-8")
    result = prepare("alpaca", "--source", str(tmp_path / "bom.jsonl"), "--out", str(tmp_path / "bom-out.jsonl"))
    assert result.returncode == 0, result.stderr
    assert lines(tmp_path / "bom-out.jsonl") == rows[:1]


def test_a_saved_dataset_folder_is_read_by_split_and_a_file_takes_no_split(tmp_path):
    import datasets

    rows = {split: [{"instruction": f"{split} question {i}", "input": "", "output": f"answer {i}"} for i in range(3)]
            for split in ("train", "validation")}
    folder = tmp_path / "saved"
    datasets.DatasetDict({split: datasets.Dataset.from_list(split_rows)
                          for split, split_rows in rows.items()}).save_to_disk(str(folder))
    out = tmp_path / "rows.jsonl"
    result = prepare("alpaca", "--source", str(folder), "--split", "validation", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote 3 rows to {out} from {folder} (split validation)"
    assert lines(out) == rows["validation"]
    assert prepare("alpaca", "--source", str(folder), "--out", str(out)).returncode == 0
    assert lines(out) == rows["train"]  # the default split
    missing = prepare("alpaca", "--source", str(folder), "--split", "test", "--out", str(tmp_path / "no.jsonl"))
    assert missing.returncode == 2 and not (tmp_path / "no.jsonl").exists()
    assert missing.stderr.strip() == f"error: {folder}: no split 'test'; it has ['train', 'validation'] (pass --split)"
    single = tmp_path / "single"  # a saved Dataset, not a DatasetDict: one split, read whole
    datasets.Dataset.from_list(rows["train"]).save_to_disk(str(single))
    whole = prepare("alpaca", "--source", str(single), "--out", str(out))
    assert whole.returncode == 0 and whole.stdout.strip() == f"wrote 3 rows to {out} from {single}"  # no split named
    assert lines(out) == rows["train"]
    one_split = prepare("alpaca", "--source", str(single), "--split", "test", "--out", str(tmp_path / "no.jsonl"))
    assert one_split.returncode == 2 and not (tmp_path / "no.jsonl").exists()
    assert f"{single}: a saved dataset of one split, read whole: it has no split 'test'" in one_split.stderr
    one_file = write_jsonl(tmp_path / "one.jsonl", rows["train"])
    refused = prepare("alpaca", "--source", str(one_file), "--split", "validation", "--out", str(tmp_path / "no.jsonl"))
    assert refused.returncode == 2 and not (tmp_path / "no.jsonl").exists()
    assert f"--split validation: {one_file} is one file, read whole (it has no splits)" in refused.stderr


def test_an_empty_csv_cell_or_a_null_is_named_empty_not_missing(tmp_path):
    source = tmp_path / "rows.csv"
    source.write_text("instruction,input,output\nAdd 1 and 1.,,2\nAdd 2 and 2.,,\n")
    result = prepare("alpaca", "--source", str(source), "--out", str(tmp_path / "rows.jsonl"))
    assert result.returncode == 1
    # (`datasets` may print its progress to stderr first)
    said = "is empty (a null, an empty cell, or not given in this row of a table)"
    assert f"{source}: row 2: field 'output' {said}" in result.stderr.splitlines()
    nulls = write_jsonl(tmp_path / "nulls.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": None,
                                                                                         "output": "c"}])
    result = prepare("alpaca", "--source", str(nulls), "--out", str(tmp_path / "nulls-out.jsonl"))
    assert result.stderr.splitlines()[0] == f"{nulls}: row 2: field 'instruction' {said}"
