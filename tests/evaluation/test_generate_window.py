"""Batched decoding on bases with a sliding window: the 4D mask greedy_batch passes reaches every
layer as given, so the window has to be in it (Mistral: every layer; Qwen2 with use_sliding_window:
the layers past max_window_layers only)."""
from __future__ import annotations

import pytest
import torch

from trainer.evaluation.generate import decoding_mask, greedy_batch, layer_masks

WINDOW = 3


def tiny(kind: str):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, initializer_range=0.5, attn_implementation="sdpa")
    if kind == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=WINDOW, **shape))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                                             **shape))
        assert model.config.layer_types == ["full_attention", "sliding_attention"]
    return model.eval()


PROMPTS = [[5, 17, 9, 33, 2, 41, 8, 12, 60], [7, 3, 21, 50, 11]]  # both longer than the window; left-padded


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_left_padded_decoding_keeps_the_window_and_equals_a_plain_reforward(kind):
    model = tiny(kind)
    real = torch.tensor([[True] * 9, [False] * 4 + [True] * 5])
    ids = torch.tensor([PROMPTS[0], [0] * 4 + PROMPTS[1]])
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=layer_masks(model, real, 9), position_ids=positions).logits
        alone = [model(input_ids=torch.tensor([p])).logits[0] for p in PROMPTS]  # transformers' own masks
        unwindowed = model(input_ids=ids, attention_mask=decoding_mask(real, 9), position_ids=positions).logits
    torch.testing.assert_close(batched[0], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched[1, 4:], alone[1], rtol=1e-5, atol=1e-5)
    assert (unwindowed[0] - alone[0]).abs().max() > 1e-2  # the window matters here: the test can fail

    def reforward(prompt: list[int]) -> list[int]:  # no cache, no padding: the definition of greedy
        tokens = list(prompt)
        for _ in range(6):
            with torch.no_grad():
                tokens.append(int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
        return tokens[len(prompt):]

    decoded = greedy_batch(model, PROMPTS, 6, eos_token_id=63, pad_token_id=0, device=torch.device("cpu"))
    assert decoded == [reforward(p) for p in PROMPTS]


def test_a_window_mask_sees_the_last_window_positions_and_padding_only_itself():
    real = torch.tensor([[False, True, True, True, True, True]])
    mask = decoding_mask(real, 6, window=3)[0, 0]
    assert torch.equal(mask[5], torch.tensor([False, False, False, True, True, True]))
    assert torch.equal(mask[2], torch.tensor([False, True, True, False, False, False]))
    assert torch.equal(mask[0], torch.tensor([True, False, False, False, False, False]))
    step = decoding_mask(torch.ones(1, 7, dtype=torch.bool), 1, window=3)[0, 0, 0]
    assert torch.equal(step, torch.tensor([False] * 4 + [True] * 3))
