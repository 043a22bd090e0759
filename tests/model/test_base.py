"""Loading the frozen base: what bitsandbytes prints about it."""
from __future__ import annotations

import logging

import pytest

import torch

from trainer.recipe_loading import recipe_from_dict
from trainer.model.base import load_base


def test_the_int8_cast_warning_is_silenced_and_nothing_else(small_base_path, caplog):
    """On a GPU in bf16, bitsandbytes' MatMul8bitLt logs a cast warning on every call (hundreds of
    lines per micro-batch). On the CPU it runs outside training (no grad), with fp32 inputs."""
    model, _ = load_base(recipe_from_dict({"model": {"name_or_path": small_base_path}, "quant": {"bits": 8}}),
                         torch.device("cpu"))
    assert any(type(m).__name__ == "Linear8bitLt" for m in model.modules())
    logger = logging.getLogger("bitsandbytes.autograd._functions")

    def cast_warnings() -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="bitsandbytes"), torch.no_grad():
            model.eval()(input_ids=torch.tensor([[1, 5, 9, 12]]))
            logger.warning("another bitsandbytes warning")
        messages = [record.getMessage() for record in caplog.records]
        assert "another bitsandbytes warning" in messages
        return [message for message in messages if message.startswith("MatMul8bitLt")]

    # On the CPU, eval runs training's float product (exact_int8_off_gpu); LLM.int8's, which logs the
    # cast, is what a GPU runs: reached here with that hook off.
    for layer in model.modules():
        if type(layer).__name__ == "Linear8bitLt":
            layer._forward_pre_hooks.clear()
    assert cast_warnings() == []
    filters = logger.filters[:]
    for installed in filters:
        logger.removeFilter(installed)
    try:  # without the filter, the same forward logs it once per 8-bit layer
        assert len(cast_warnings()) == sum(type(m).__name__ == "Linear8bitLt" for m in model.modules())
    finally:
        for installed in filters:
            logger.addFilter(installed)


def _file_mappings() -> list[tuple[int, int]]:
    """The address ranges this process maps from checkpoint files (Linux' /proc/self/maps)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].endswith(".safetensors"):
                low, high = (int(bound, 16) for bound in fields[0].split("-"))
                ranges.append((low, high))
    return ranges


def test_no_weight_is_left_a_view_of_the_mapped_checkpoint(small_base_path):
    import itertools
    import os

    if not os.path.exists("/proc/self/maps"):
        pytest.skip("reads Linux' /proc/self/maps")
    recipe = recipe_from_dict({"model": {"name_or_path": small_base_path}, "quant": {"bits": 4}})
    model, _ = load_base(recipe, torch.device("cpu"))
    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    assert any(t.is_floating_point() for t in tensors)  # the embedding and norms, not quantised
    mapped = _file_mappings()
    in_file = [t.shape for t in tensors if any(low <= t.untyped_storage().data_ptr() < high for low, high in mapped)]
    assert in_file == []
    if model.config.tie_word_embeddings:  # still one tensor for both (SmolLM2's are tied)
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_8bit_layers_off_a_gpu_evaluate_what_training_computes_whatever_shares_the_batch(small_base_path):
    """bitsandbytes' CPU eval mode is LLM.int8 (inputs rounded to int8, outlier columns picked over the
    whole batch): another function than training's, and one that moves with the batch. Evaluation,
    sampling and chat must score the model that was trained (and that export merges)."""
    model, _ = load_base(recipe_from_dict({"model": {"name_or_path": small_base_path}, "quant": {"bits": 8}}),
                         torch.device("cpu"))
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (3, 12))
    with torch.no_grad():
        trained = model.train()(input_ids=ids).logits
        together = model.eval()(input_ids=ids).logits
        alone = torch.cat([model(input_ids=row[None]).logits for row in ids])
    assert not model.training
    torch.testing.assert_close(together, trained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-5)
