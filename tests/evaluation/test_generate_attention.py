"""Batched decoding under attention implementations that read the mask their own way: flash kernels
(flash_attention_2/3/4, hub kernels) unpad by a [batch, keys] mask and cannot take greedy_batch's 4D
one (transformers passes a 4D mask through as given). No flash kernel runs on a CPU, so a stand-in
registered like one (transformers' own flash mask function, the flash contract: causal from the
bottom right over the unpadded keys) checks what greedy_batch hands it and decodes with SDPA."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.evaluation.generate import greedy_batch

UNPADDED = "test_unpadded_attention"
PROMPTS = [[5, 17, 9, 33, 2, 41, 8, 12, 60], [7, 3, 21, 50, 11], [4]]  # left-padded to 9
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
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5,
                                         attn_implementation="sdpa")).eval()

    def reforward(prompt: list[int]) -> list[int]:  # SDPA, no cache, no padding: the definition of greedy
        tokens = list(prompt)
        for _ in range(6):
            with torch.no_grad():
                tokens.append(int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
        return tokens[len(prompt):]

    expected = [reforward(prompt) for prompt in PROMPTS]
    model.set_attn_implementation(UNPADDED)
    decoded = greedy_batch(model, PROMPTS, 6, eos_token_id=63, pad_token_id=0, device=torch.device("cpu"))
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
