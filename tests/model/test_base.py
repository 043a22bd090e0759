"""Loading the frozen base: what bitsandbytes prints about it."""
from __future__ import annotations

import logging

import torch

from trainer.config import recipe_from_dict
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

    assert cast_warnings() == []
    filters = logger.filters[:]
    for installed in filters:
        logger.removeFilter(installed)
    try:  # without the filter, the same forward logs it once per 8-bit layer
        assert len(cast_warnings()) == sum(type(m).__name__ == "Linear8bitLt" for m in model.modules())
    finally:
        for installed in filters:
            logger.addFilter(installed)
