"""The masks of batched decoding (greedy_batch), each checked against a plain re-forward of every prompt
alone (no cache, no padding: the definition of greedy).

Bases with a sliding window: the 4D mask greedy_batch passes reaches every layer as given, so the window
has to be in it (Mistral: every layer; Qwen2 with use_sliding_window: the layers past max_window_layers
only).

Attention implementations that read the mask their own way: flash kernels (flash_attention_2/3/4, hub
kernels) unpad by a [batch, keys] mask and cannot take greedy_batch's 4D one (transformers passes a 4D
mask through as given). No flash kernel runs on a CPU, so a stand-in registered like one (transformers'
own flash mask function, the flash contract: causal from the bottom right over the unpadded keys) checks
what greedy_batch hands it and decodes with SDPA."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.evaluation.generate import decoding_mask, greedy_batch, layer_masks

WINDOW = 3
SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, initializer_range=0.5, attn_implementation="sdpa")


def reforward(model, prompt: list[int], steps: int = 6) -> list[int]:
    """Greedy by definition: the whole sequence forwarded again for each token, no cache, no padding."""
    tokens = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            tokens.append(int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt):]


def tiny(kind: str):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if kind == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=WINDOW, **SHAPE))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                                             **SHAPE))
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

    decoded = greedy_batch(model, PROMPTS, 6, eos_token_id=63, pad_token_id=0, device=torch.device("cpu"))
    assert decoded == [reforward(model, p) for p in PROMPTS]


def test_a_window_mask_sees_the_last_window_positions_and_padding_only_itself():
    real = torch.tensor([[False, True, True, True, True, True]])
    mask = decoding_mask(real, 6, window=3)[0, 0]
    assert torch.equal(mask[5], torch.tensor([False, False, False, True, True, True]))
    assert torch.equal(mask[2], torch.tensor([False, True, True, False, False, False]))
    assert torch.equal(mask[0], torch.tensor([True, False, False, False, False, False]))
    step = decoding_mask(torch.ones(1, 7, dtype=torch.bool), 1, window=3)[0, 0, 0]
    assert torch.equal(step, torch.tensor([False] * 4 + [True] * 3))


# ------------------------------------------------------------------------------ flash-style attention

UNPADDED = "test_unpadded_attention"
UNEVEN_PROMPTS = [*PROMPTS, [4]]  # left-padded to 9
masks_seen: list[int] = []


def unpadded_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [batch, heads, q, d], key/value [batch, kv_heads, keys, d]; `attention_mask` None or the
    [batch, keys] padding mask, as flash_attention_2 takes it."""
    masks_seen.append(-1 if attention_mask is None else attention_mask.dim())
    assert attention_mask is None or attention_mask.dim() == 2, f"a {attention_mask.dim()}D mask reached a flash kernel"
    queries, keys = query.shape[2], key.shape[2]
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    rows = torch.arange(keys - queries, keys)[:, None]
    columns = torch.arange(keys)[None, :]
    real = torch.ones(query.shape[0], keys, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    visible = (columns <= rows)[None] & real[:, None, :] | (columns == rows)[None]  # padding sees itself only
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=visible[:, None], scale=scaling)
    return output.transpose(1, 2).contiguous(), None


def test_a_flash_style_attention_gets_the_2d_padding_mask_and_decodes_as_a_plain_reforward():
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(UNPADDED, unpadded_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(UNPADDED, flash_attention_mask)  # what flash_attention_2 is given
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    expected = [reforward(model, prompt) for prompt in UNEVEN_PROMPTS]  # under SDPA
    model.set_attn_implementation(UNPADDED)
    decoded = greedy_batch(model, UNEVEN_PROMPTS, 6, eos_token_id=63, pad_token_id=0, device=torch.device("cpu"))
    assert decoded == expected
    assert 2 in masks_seen  # the padding mask reached the kernel (the batch is left-padded)


def test_which_attention_gets_greedy_batchs_own_mask():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask, sdpa_mask

    from trainer.evaluation.generate import takes_own_mask

    for name in ("sdpa", "eager", "packed_sdpa"):
        assert takes_own_mask(name)
    for name in ("flash_attention_2", "flash_attention_3", "flex_attention"):
        assert not takes_own_mask(name)
    # hub kernels: as transformers masks them (an sdpa-masked kernel would otherwise get rows of padding
    # with nothing to attend to)
    AttentionInterface.register("test_sdpa_masked_kernel", unpadded_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("test_sdpa_masked_kernel", sdpa_mask)
    ALL_MASK_ATTENTION_FUNCTIONS.register(UNPADDED, flash_attention_mask)
    assert takes_own_mask("test_sdpa_masked_kernel") and not takes_own_mask(UNPADDED)
