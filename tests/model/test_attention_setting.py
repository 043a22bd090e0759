"""model.attn_implementation: a name transformers knows but cannot use here (flash_attention_2 without
its package) is reported as that setting's problem, never as a base to point model.name_or_path
elsewhere (the typos are refused by the recipe: tests/test_config.py)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from trainer.recipe_loading import recipe_from_dict
from trainer.model.base import ModelLoadError, load_base


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash_attn is installed here")
def test_an_attention_implementation_that_cannot_load_names_the_setting_not_the_path(tiny_base):
    recipe = recipe_from_dict({"model": {"name_or_path": str(tiny_base), "attn_implementation": "flash_attention_2"},
                               "quant": {"bits": 16}})
    with pytest.raises(ModelLoadError) as failure:
        load_base(recipe, torch.device("cpu"))
    said = str(failure.value)
    assert said.startswith("model.attn_implementation=flash_attention_2 cannot be used here: FlashAttention2")
    assert "set model.attn_implementation=sdpa (the default) or eager" in said
    assert "model.name_or_path" not in said
