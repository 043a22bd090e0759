"""Packing: several examples per row must give exactly the loss and gradients of the same examples
padded one per row, with positions reset per example and no attention across examples."""
from __future__ import annotations

import pytest
import torch

from trainer.data.tasks import demo_rows
from trainer.recipe_loading import recipe_from_dict
from trainer.data.examples import IGNORE_INDEX, Example
from trainer.data.batching import collate
from trainer.model.adapters import adapter_parameters, lora_layers
from trainer.model.lora import apply_lora
from trainer.loss import CausalLMLoss
from trainer.model.base import load_base
from trainer.data.packing import collate_packed, pack_rows, training_collate
from trainer.speedups import blocked_attention
from trainer.speedups.packed_attention import PACKED_ATTENTION, use_packed_attention

MAX_SEQ_LEN = 64


@pytest.fixture(scope="module")
def examples(small_tokenizer) -> list[Example]:
    """Short prompt/response pairs (BOS + prompt masked, response + EOS trained): 2-4 fit in a row."""
    examples = []
    for row_id, row in enumerate(demo_rows(10, seed=7)):
        prompt = small_tokenizer(f"{row['instruction']}\n{row['input']}\n", add_special_tokens=False)["input_ids"]
        response = small_tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [small_tokenizer.eos_token_id]
        prompt = [small_tokenizer.bos_token_id] + prompt
        examples.append(Example(100 + row_id, prompt + response, [IGNORE_INDEX] * len(prompt) + response))
    return examples


def lora_model(small_base_path: str, attention: str = "sdpa") -> torch.nn.Module:
    recipe = recipe_from_dict({"model": {"name_or_path": small_base_path, "attn_implementation": attention},
                               "quant": {"bits": 16}})
    model, _ = load_base(recipe, torch.device("cpu"))
    torch.manual_seed(0)
    apply_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"], r=4, alpha=8.0)
    for layer in lora_layers(model).values():  # B != 0, so the adapters change the output
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    return model


def loss_and_grads(loss_model: CausalLMLoss, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    loss_model.zero_grad()
    loss_sum, tokens = loss_model(**batch)
    loss_sum.backward()
    return loss_sum.detach(), tokens, {n: p.grad.clone() for n, p in adapter_parameters(loss_model.model).items()}


def test_pack_rows_places_every_example_once_within_capacity():
    lengths = [50, 10, 90, 40, 40, 5, 96, 30]
    rows = pack_rows(lengths, 96)
    assert rows == [[6], [2, 5], [0, 3], [4, 7, 1]]  # first-fit decreasing
    assert pack_rows([120, 3], 96) == [[0], [1]]  # too long for a row: a row of its own


def test_collate_packed_lays_out_examples_with_positions_reset(examples):
    batch = collate_packed(examples, MAX_SEQ_LEN, pad_token_id=0)
    rows, length = batch["input_ids"].shape
    assert rows < len(examples) and length <= MAX_SEQ_LEN
    assert batch["attention_mask"].shape == (rows, 1, length, length) and batch["attention_mask"].dtype == torch.bool
    by_row_id = {e.row_id: e for e in examples}
    placed = iter(by_row_id[i] for i in batch["row_ids"].tolist())
    for r in range(rows):
        lengths = [n for n in batch["segment_lengths"][r].tolist() if n]
        tail = length - sum(lengths)
        start = 0
        for n in lengths + ([tail] if tail else []):
            span = slice(start, start + n)
            assert batch["position_ids"][r, span].tolist() == list(range(n))
            assert batch["labels"][r, start] == IGNORE_INDEX  # never trained across a boundary
            block = batch["attention_mask"][r, 0, span]
            assert block[:, span].equal(torch.ones(n, n, dtype=torch.bool).tril())
            assert block.sum() == n * (n + 1) // 2  # nothing outside its own block
            start += n
        start = 0
        for n in lengths:
            example = next(placed)
            assert batch["input_ids"][r, start:start + n].tolist() == list(example.input_ids)
            assert batch["labels"][r, start + 1:start + n].tolist() == list(example.labels[1:])
            start += n
        assert batch["input_ids"][r, start:].eq(0).all() and batch["labels"][r, start:].eq(IGNORE_INDEX).all()
    assert next(placed, None) is None and sorted(batch["row_ids"].tolist()) == sorted(by_row_id)


@pytest.mark.parametrize("attention", ["sdpa", "eager", "packed", "blocked"])
def test_packed_loss_and_gradients_equal_unpacked(small_base_path, small_tokenizer, examples, attention, monkeypatch):
    model = lora_model(small_base_path, "eager" if attention == "eager" else "sdpa")
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention
    loss_model = CausalLMLoss(model)
    unpacked = loss_and_grads(loss_model, collate(examples, small_tokenizer.pad_token_id))
    calls = []
    if attention == "blocked":  # count the examples through trainer/speedups/blocked_attention.py
        monkeypatch.setattr(blocked_attention, "attention",
                            lambda *args, original=blocked_attention.attention: calls.append(args[3]) or original(*args))
    if attention in ("packed", "blocked"):  # rows joined without padding, attention per example: the loop's collate
        use_packed_attention(model, blocked=attention == "blocked")
        recipe = recipe_from_dict({"data": {"max_seq_len": MAX_SEQ_LEN}})
        packed_batch = training_collate(recipe, model, small_tokenizer.pad_token_id)(examples)
        assert "attention_mask" not in packed_batch
    else:
        packed_batch = collate_packed(examples, MAX_SEQ_LEN, small_tokenizer.pad_token_id)
    packed = loss_and_grads(loss_model, packed_batch)
    if attention == "blocked":  # every layer, all examples at once
        assert len(calls) == model.config.num_hidden_layers and len(calls[0]) == len(examples)
    assert packed_batch["input_ids"].shape[0] < len(examples)
    assert packed[1] == unpacked[1]  # the same trained tokens
    torch.testing.assert_close(packed[0], unpacked[0], rtol=1e-5, atol=1e-4)
    for name in unpacked[2]:
        torch.testing.assert_close(packed[2][name], unpacked[2][name], rtol=1e-4, atol=1e-5,
                                   msg=lambda message, name=name: f"{name}: {message}")


def test_packed_attention_leaves_padded_batches_unchanged(small_base_path, small_tokenizer, examples):
    model = lora_model(small_base_path)
    batch = collate(examples, small_tokenizer.pad_token_id)
    before = CausalLMLoss(model)(**batch)[0]
    use_packed_attention(model)
    assert torch.equal(CausalLMLoss(model)(**batch)[0], before)


@pytest.mark.parametrize("attention", ["mask", "packed"])
def test_changing_one_example_leaves_the_next_one_in_its_row_unchanged(small_base_path, small_tokenizer, examples, attention):
    model = lora_model(small_base_path)
    batch = collate_packed(examples, MAX_SEQ_LEN, small_tokenizer.pad_token_id)
    row = next(r for r in range(len(batch["input_ids"])) if batch["segment_lengths"][r, 1] > 0)  # 2+ examples
    first, second = batch["segment_lengths"][row, :2].tolist()
    mask = batch["attention_mask"][row:row + 1]
    if attention == "packed":  # no mask: the examples are found where position_ids restart
        use_packed_attention(model)
        mask = None

    def logits(input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=input_ids[None], attention_mask=mask,
                         position_ids=batch["position_ids"][row:row + 1]).logits[0]

    original = batch["input_ids"][row]
    changed = original.clone()
    changed[1:first] = (changed[1:first] + 7) % 1000  # rewrite example 1 after its BOS
    before, after = logits(original), logits(changed)
    assert not torch.allclose(before[:first], after[:first])
    assert torch.equal(after[first:first + second], before[first:first + second])


def test_packing_is_the_default_and_falls_back_where_attention_cannot_isolate_examples(examples, capsys):
    from types import SimpleNamespace

    recipe = recipe_from_dict({"data": {"max_seq_len": MAX_SEQ_LEN}})
    assert recipe.data.packing
    flash = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    batch = training_collate(recipe, flash, pad_token_id=0)(examples[:4])
    assert "segment_lengths" not in batch and batch["input_ids"].shape[0] == 4  # one example per row
    assert "training with one example per row" in capsys.readouterr().out


@pytest.mark.parametrize("attention", ["sdpa", "eager", PACKED_ATTENTION])
def test_the_collate_follows_the_models_attention_and_leaves_it_as_it_is(examples, attention):
    from types import SimpleNamespace

    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation=attention))
    batch = training_collate(recipe_from_dict({"data": {"max_seq_len": MAX_SEQ_LEN}}), model, 0)(examples)
    assert batch["input_ids"].shape[0] < len(examples) and "segment_lengths" in batch  # packed
    assert ("attention_mask" in batch) == (attention != PACKED_ATTENTION)  # per example: no mask to build
    assert model.config._attn_implementation == attention
    unpacked = training_collate(recipe_from_dict({"data": {"packing": False}}), model, 0)(examples)
    assert unpacked["input_ids"].shape[0] == len(examples)


# Operations whose result size or value the host must read: on a GPU each makes the CPU wait for it.
HOST_READS = ("aten.nonzero", "aten._local_scalar_dense", "aten.item", "aten.masked_select")


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operations in HOST_READS (and boolean-mask indexing, which hides a nonzero)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        boolean_index = name == "aten.index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or [])
        if name in HOST_READS or boolean_index:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_packed_training_reads_nothing_back_from_the_device_inside_the_model(small_base_path, small_tokenizer,
                                                                             examples):
    """The collate knows the examples' lengths and trained positions on the host: no layer waits
    on a device value, forward or backward. One read per forward is transformers' own (its mask
    preparation checks position_ids for packed sequences, once, before the layers)."""
    batch = collate_packed(examples, 64, small_tokenizer.pad_token_id, with_mask=False)
    model = lora_model(small_base_path)
    use_packed_attention(model)
    loss_model = CausalLMLoss(model)
    counter = HostReads()
    decoder = model.get_decoder()
    decoder.register_forward_pre_hook(lambda *_: [counter.__enter__(), None][1])
    decoder.register_forward_hook(lambda *_: [counter.__exit__(None, None, None), None][1])
    loss_sum, _ = loss_model(**batch)
    assert counter.seen == ["aten._local_scalar_dense"]
    counter.seen.clear()
    with counter:
        loss_sum.backward()
    assert counter.seen == []
    # Without the lengths (a caller with position_ids only), every layer looks for the examples' starts.
    with counter, torch.no_grad():
        model(input_ids=batch["input_ids"][:1], position_ids=batch["position_ids"][:1])
    assert counter.seen.count("aten.nonzero") >= model.config.num_hidden_layers


def test_a_sliding_window_is_kept_by_packed_attention_and_eager_packing_falls_back(examples, capsys):
    # A Mistral-style base whose layers see the last 6 positions only: packed per example (SDPA), each
    # example longer than the window gives the loss and gradients of the same examples one per row,
    # where transformers builds the window into its own mask.
    from types import SimpleNamespace

    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=1100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=6, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = MistralForCausalLM(config).requires_grad_(False)
    apply_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"], r=4, alpha=8.0)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    loss_model = CausalLMLoss(model)
    batch = examples[:4]
    assert min(len(example.input_ids) for example in batch) > config.sliding_window
    expected = loss_and_grads(loss_model, collate(batch, pad_token_id=0))
    use_packed_attention(model)
    packed = loss_and_grads(loss_model, collate_packed(batch, MAX_SEQ_LEN, pad_token_id=0, with_mask=False))
    torch.testing.assert_close(packed[0], expected[0], rtol=1e-5, atol=1e-4)
    for name, grad in expected[2].items():
        torch.testing.assert_close(packed[2][name], grad, rtol=1e-4, atol=1e-5)
    # A packed row's one 4D mask cannot hold the window: eager attention trains one example per row.
    eager = SimpleNamespace(config=SimpleNamespace(_attn_implementation="eager", sliding_window=6))
    recipe = recipe_from_dict({"data": {"max_seq_len": MAX_SEQ_LEN}})
    assert training_collate(recipe, eager, 0)(batch)["input_ids"].shape[0] == len(batch)
    assert "cannot keep the model's sliding window (6 tokens" in capsys.readouterr().out
    wide = SimpleNamespace(config=SimpleNamespace(_attn_implementation="eager", sliding_window=MAX_SEQ_LEN))
    assert training_collate(recipe, wide, 0)(batch)["input_ids"].shape[0] < len(batch)  # the window never binds
