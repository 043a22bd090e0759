"""Hub datasets read as a stream (data.streaming): the hub is played by `datasets.load_dataset`
streaming a local .jsonl file, a real IterableDataset. The store it gives is the bytes the file
gives read normally, so the split, the held-out rows and the batches are the same; max_rows stops
the stream; bad rows are named by dataset and row; a cached store is used without opening it."""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest

from trainer.config import DataConfig, DataSource
from trainer.data.batching import BatchPlan
from trainer.data.building import build_store
from trainer.data.formats import DataError
from trainer.data.pipeline import build_datasets, held_out_rows, load_source
from trainer.data.sources import locate
from trainer.data.store import Store

HUB_ID = "org/alpaca"


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


def rows(count: int) -> list[dict]:
    """Varied lengths (some cut at max_seq_len=80), and every third row without an `input` key, which
    Arrow fills with None where a .jsonl line simply lacks it."""
    return [{"instruction": f"Repeat the word {i} " + "again " * (i % 7), "output": f"word {i} " * (1 + i % 5),
             **({} if i % 3 == 0 else {"input": "x " * (i % 23)})} for i in range(count)]


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


class FakeHub:
    """`datasets.load_dataset` where HUB_ID is `file`: streamed (load_dataset("json", ...,
    streaming=True), counting the records the reader takes) or loaded into Arrow, as asked."""

    def __init__(self, monkeypatch, file: Path):
        self.file, self.calls, self.records_taken = file, [], 0
        self._real = datasets.load_dataset
        monkeypatch.setattr(datasets, "load_dataset", self.load_dataset)

    def load_dataset(self, path, *args, **kwargs):
        if path != HUB_ID:
            return self._real(path, *args, **kwargs)
        self.calls.append(kwargs)
        if not kwargs.get("streaming"):
            return self._real("json", data_files=str(self.file), split="train")
        stream = self._real("json", data_files=str(self.file), split="train", streaming=True)
        assert isinstance(stream, datasets.IterableDataset)
        return stream.map(self._taken)

    def _taken(self, record: dict) -> dict:
        self.records_taken += 1
        return record


def config(path: str, **settings) -> DataConfig:
    return DataConfig(path=str(path), max_seq_len=80, **settings)


def build(path: str, tokenizer, out: Path, workers: int = 2, chunk_rows: int = 8, **settings) -> Store:
    data = config(path, **settings)
    return build_store(locate(str(path), streaming=data.streaming), DataSource(str(path)), data, tokenizer, out,
                       workers, chunk_rows)


def arrays(store: Store) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(store.path.glob("*.npy"))}


def test_a_streamed_store_is_the_bytes_of_the_file_read_normally(tokenizer, tmp_path, monkeypatch):
    file = write_jsonl(tmp_path / "d.jsonl", rows(61))
    hub = FakeHub(monkeypatch, file)
    streamed = build(HUB_ID, tokenizer, tmp_path / "streamed", streaming=True)
    from_file = build(str(file), tokenizer, tmp_path / "file")

    assert hub.calls == [{"split": "train", "streaming": True}] and hub.records_taken == 61
    assert arrays(streamed) == arrays(from_file) and len(arrays(streamed)) == 7
    assert {**streamed.info, "name": None, "source": None} == {**from_file.info, "name": None, "source": None}
    assert streamed.info["name"] == f"{HUB_ID} (split train)" and streamed.info["records"] == 61
    assert streamed.info["source"]["streaming"] and not from_file.info["source"]["streaming"]


def test_the_split_held_out_rows_and_batches_are_those_of_the_file(tokenizer, tmp_path, monkeypatch):
    file = write_jsonl(tmp_path / "d.jsonl", rows(80))
    hub = FakeHub(monkeypatch, file)
    settings = {"eval_fraction": 0.2, "cache": False}
    streamed_config = config(HUB_ID, streaming=True, **settings)
    train, held_out, stats = build_datasets(streamed_config, tokenizer, seed=3)
    file_train, file_held_out, _ = build_datasets(config(str(file), **settings), tokenizer, seed=3)

    assert list(train) == list(file_train) and list(held_out) == list(file_held_out) and len(held_out) > 10
    assert np.array_equal(held_out.row_ids(), file_held_out.row_ids())
    # The resume cursor is a step of a plan over the examples: the same examples, the same batches.
    plan, file_plan = BatchPlan(len(train), 8, seed=3), BatchPlan(len(file_train), 8, seed=3)
    assert [plan.indices(step) for step in range(12)] == [file_plan.indices(step) for step in range(12)]
    # Held-out rows are read back from the stream, up to the last one wanted.
    taken = hub.records_taken
    assert held_out_rows(streamed_config, held_out) == held_out_rows(config(str(file), **settings), file_held_out)
    assert hub.records_taken - taken == held_out.row_ids().max() + 1 < 80
    assert all(kwargs["streaming"] for kwargs in hub.calls)
    assert stats["datasets"][0]["name"] == f"{HUB_ID} (split train)"


def test_max_rows_stops_the_stream_there(tokenizer, tmp_path, monkeypatch):
    file = write_jsonl(tmp_path / "d.jsonl", rows(200))
    hub = FakeHub(monkeypatch, file)
    streamed = build(HUB_ID, tokenizer, tmp_path / "streamed", streaming=True, max_rows=21)
    assert streamed.info["records"] == 21 and hub.records_taken == 21  # record 22 was never asked for
    assert arrays(streamed) == arrays(build(str(file), tokenizer, tmp_path / "file", max_rows=21))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_bad_row_in_the_stream_is_named_by_dataset_and_row(tokenizer, tmp_path, monkeypatch, workers):
    FakeHub(monkeypatch, write_jsonl(tmp_path / "bad.jsonl", [*rows(29), {"instruction": "x"}, *rows(10)]))
    with pytest.raises(DataError, match=rf"^{HUB_ID} \(split train\): row 30: field 'output' is empty"):
        build(HUB_ID, tokenizer, tmp_path / "store", workers, streaming=True)
    assert not (tmp_path / "store").exists()


def test_a_stream_that_fails_is_named_with_the_last_row_read(tokenizer, tmp_path, monkeypatch):
    FakeHub(monkeypatch, write_jsonl(tmp_path / "broken.jsonl", [*rows(12), '{"instruction": ']))
    with pytest.raises(DataError, match=rf"^{HUB_ID} \(split train\): the stream failed after row \d+: "
                                        r".*JSON parse error"):
        build(HUB_ID, tokenizer, tmp_path / "store", streaming=True)


def test_a_second_run_uses_the_cached_store_without_opening_the_stream(tokenizer, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch, write_jsonl(tmp_path / "d.jsonl", rows(30)))
    data = config(HUB_ID, streaming=True)
    first = load_source(DataSource(HUB_ID), data, tokenizer, workers=1)
    assert first.cache == "miss" and len(hub.calls) == 1 and hub.records_taken == 30
    second = load_source(DataSource(HUB_ID), data, tokenizer, workers=1)
    assert second.cache == "hit" and len(hub.calls) == 1 and hub.records_taken == 30
    assert arrays(second.store) == arrays(first.store)
    # The key is the id and split (no fingerprint before the stream is read): another split is another store.
    located = locate(HUB_ID, "train", streaming=True)
    assert located.identity != locate(HUB_ID, "test", streaming=True).identity
    assert located.count(None) is None and len(hub.calls) == 1  # the length is unknown: rows/s, no ETA


def test_without_streaming_a_hub_dataset_is_loaded_whole_as_before(tokenizer, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch, write_jsonl(tmp_path / "d.jsonl", rows(30)))
    loaded = load_source(DataSource(HUB_ID), config(HUB_ID, cache=False), tokenizer, workers=1)
    assert hub.calls == [{"split": "train", "streaming": False}] and hub.records_taken == 0
    assert loaded.records == 30 and not loaded.store.info["source"]["streaming"]


def test_a_local_file_reads_the_same_with_streaming_on(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch, write_jsonl(tmp_path / "d.jsonl", rows(5)))
    for path in (hub.file, tmp_path / "d.csv"):
        if path.suffix == ".csv":
            path.write_text("instruction,output\nq,a\n")
        streamed, plain = locate(str(path), streaming=True), locate(str(path))
        assert streamed.identity == plain.identity and not streamed.streamed
        assert [record for _, record in streamed.read(None)] == [record for _, record in plain.read(None)]
    assert hub.calls == []
