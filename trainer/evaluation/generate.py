"""Batched greedy decoding, written out: left padding, a KV cache, stop at EOS or max_new_tokens.

Under ZeRO-3 every forward pass gathers the partitioned weights with a collective, so all ranks
must run the same number of forward passes. Work is dealt out as whole batches (batch k to rank
k mod world); a rank with fewer batches decodes a dummy one, and a batch stops only when every
rank's batch is done. A batch holds the same prompts whatever the world size, so 1 rank and N
ranks compute the same tokens.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from transformers import DynamicCache

from trainer.config import PACKED_ATTENTION
from trainer.data.encoding import prompt_tokens
from trainer.loss import CausalLMLoss, additive_mask
from trainer.runtime import distributed


def prompt_ids(tokenizer, row: dict, template: str, max_prompt_tokens: int | None = None) -> list[int]:
    """The prompt training puts before the response (instruction template, or for chat rows and
    data.template=chat the conversation up to the first assistant turn), tokenised and cut to
    `max_prompt_tokens` exactly as training does (trainer.data.encoding.prompt_tokens)."""
    return prompt_tokens(tokenizer, row, template, max_prompt_tokens)


def row_texts(row: dict) -> dict[str, str]:
    """instruction, input and reference of a row; a chat row's first user and assistant turns."""
    if "messages" not in row:
        return {"instruction": row["instruction"], "input": row.get("input", ""), "reference": row["output"]}
    user = next((m["content"] for m in row["messages"] if m["role"] == "user"), "")
    answer = next((m["content"] for m in row["messages"] if m["role"] == "assistant"), "")
    return {"instruction": user, "input": "", "reference": answer}


@torch.no_grad()
def greedy_batch(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | Iterable[int],
                 pad_token_id: int, device: torch.device, lockstep: bool = False) -> list[list[int]]:
    """Greedy continuations of `prompts` (token ids, no padding), each up to its first stop token
    (`eos_token_id`: one id, or several as `stop_ids` gives them), which is excluded. With
    `lockstep`, decoding goes on until every rank's batch is done (call it on every rank).

    `model` is the causal LM, or the `CausalLMLoss` around it (what DeepSpeed wraps): under ZeRO-3
    each forward must enter through that top module, whose hook resets DeepSpeed's per-forward
    parameter bookkeeping."""
    stops = [eos_token_id] if isinstance(eos_token_id, int) else sorted(eos_token_id)
    stop_tensor = torch.tensor(stops, device=device)
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    real = torch.zeros((len(prompts), length), dtype=torch.bool)
    for i, prompt in enumerate(prompts):  # left padding: every prompt ends at the last column
        input_ids[i, length - len(prompt):] = torch.tensor(prompt)
        real[i, length - len(prompt):] = True
    input_ids, real = input_ids.to(device), real.to(device)
    implementation = _attention_implementation(model)
    own_mask = takes_own_mask(implementation)
    additive = implementation == "eager"  # eager adds the mask to the scores
    mask_dtype = next(model.parameters()).dtype if additive else None
    cache = DynamicCache()
    generated = torch.empty((len(prompts), 0), dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    step_ids = input_ids
    for _ in range(max_new_tokens):
        # Positions count real tokens only, so a left-padded prompt sees the positions it was trained with.
        position_ids = (real.long().cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
        # Flash kernels take the [batch, keys] padding mask (they unpad by it) and flex builds its own
        # block mask from it: to them transformers' own masking is given the 2D mask, as generate() does.
        mask = layer_masks(model, real, step_ids.shape[1]) if own_mask else real.long()
        if additive:
            mask = ({kind: additive_mask(m, mask_dtype) for kind, m in mask.items()} if isinstance(mask, dict)
                    else additive_mask(mask, mask_dtype))
        output = model(input_ids=step_ids, attention_mask=mask, position_ids=position_ids,
                       use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})
        next_token = output.logits[:, -1].argmax(-1)
        next_token = torch.where(done, torch.full_like(next_token, pad_token_id), next_token)
        generated = torch.cat([generated, next_token[:, None]], dim=1)
        done |= torch.isin(next_token, stop_tensor)
        if _all_done(done, lockstep):
            break
        step_ids = next_token[:, None]
        real = torch.cat([real, torch.ones_like(step_ids, dtype=torch.bool)], dim=1)
    return [_until_stop(row, stops) for row in generated.tolist()]


# Attention implementations that take a 4D mask as given, where greedy_batch passes its own (`decoding_mask`);
# so do hub kernels that transformers masks as sdpa or eager. The others (flash_attention_2/3/4,
# flex_attention, flash-masked hub kernels) get the 2D padding mask.
OWN_MASK_IMPLEMENTATIONS = ("sdpa", "eager", PACKED_ATTENTION)


def takes_own_mask(implementation: str) -> bool:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

    return (implementation in OWN_MASK_IMPLEMENTATIONS
            or ALL_MASK_ATTENTION_FUNCTIONS.get(implementation) in (sdpa_mask, eager_mask))


def layer_masks(model: nn.Module, real: torch.Tensor, query_length: int) -> torch.Tensor | dict[str, torch.Tensor]:
    """The decoding mask the model's layers take. A 4D mask reaches every layer as given (transformers
    builds no window into it), so a base with a sliding window gets it here: Mistral-like bases (no
    `layer_types`) in their one mask; bases that mix layer types (Gemma 2/3, Qwen2 with
    use_sliding_window) a mask per type, as their forward accepts."""
    inner = model.model if isinstance(model, CausalLMLoss) else model
    config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return decoding_mask(real, query_length)
    windowed = decoding_mask(real, query_length, window)
    if types is None:
        return windowed
    return {kind: windowed if kind == "sliding_attention" else decoding_mask(real, query_length) for kind in set(types)}


def decoding_mask(real: torch.Tensor, query_length: int, window: int | None = None) -> torch.Tensor:
    """[batch, 1, query_length, keys] boolean attention mask (True = attend) for the last
    `query_length` of `real`'s [batch, keys] positions (True = a real token, False = left padding).

    Causal over the real tokens, within the last `window` positions where given (transformers' rule:
    key k for query q where q - window < k <= q); a padding position attends to itself only, as in the
    packed collate. With a 2D mask the padding rows would have nothing to attend to: CUDA's SDPA returns
    NaN for such rows, and transformers 5 no longer repairs them (0 * NaN then reaches real tokens)."""
    keys = real.shape[1]
    queries = torch.arange(keys - query_length, keys, device=real.device)[:, None]
    columns = torch.arange(keys, device=real.device)[None, :]
    visible = columns <= queries
    if window is not None:
        visible &= columns > queries - window
    attend = visible[None] & real[:, None, :]
    itself = (columns == queries)[None] & ~real[:, -query_length:, None]
    return (attend | itself)[:, None]


def cache_argument(model: nn.Module) -> str:
    """The name the model's forward takes the KV cache by: `cache` from transformers 5.25 (which
    warns on every call given the older `past_key_values`), `past_key_values` before. The
    DynamicCache is updated in place, so the output's copy is never read back."""
    inner = model.model if isinstance(model, CausalLMLoss) else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def _attention_implementation(model: nn.Module) -> str:
    inner = model.model if isinstance(model, CausalLMLoss) else model
    return inner.config._attn_implementation


def _all_done(done: torch.Tensor, lockstep: bool) -> bool:
    finished = torch.tensor([int(bool(done.all()))], device=done.device)
    if lockstep and dist.is_initialized() and distributed.world_size() > 1:
        dist.all_reduce(finished, op=dist.ReduceOp.MIN)
    return bool(finished.item())


def _until_stop(tokens: list[int], stops: list[int]) -> list[int]:
    return tokens[:next((i for i, token in enumerate(tokens) if token in stops), len(tokens))]


def stop_ids(model: nn.Module, tokenizer) -> set[int]:
    """The tokens an answer ends at: the tokenizer's EOS (what training ends every example with) and
    those the model's generation config lists (Llama-3's <|eot_id|> beside <|end_of_text|>). Eval,
    training's samples and chat stop alike."""
    inner = model.model if isinstance(model, CausalLMLoss) else model
    configured = getattr(getattr(inner, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, (list, tuple)) else [configured]
    return {token for token in (tokenizer.eos_token_id, *configured) if isinstance(token, int)}


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
             device: torch.device) -> list[str]:
    """Greedy answers to `prompts`, in order, on every rank. A collective: call it on every rank
    with the same prompts. Prompts are sorted by length first so a batch carries little padding."""
    if not prompts:
        return []
    rank, world = distributed.rank(), distributed.world_size()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    rounds = math.ceil(len(batches) / world)
    was_training = model.training
    model.eval()
    stops = stop_ids(model, tokenizer)
    mine: dict[int, str] = {}
    for round_index in range(rounds):
        batch_index = round_index * world + rank
        # A rank without a batch this round decodes a dummy one, to keep the collectives in step.
        batch = batches[batch_index] if batch_index < len(batches) else batches[0][:1]
        outputs = greedy_batch(model, [prompts[i] for i in batch], max_new_tokens, stops,
                               tokenizer.pad_token_id, device, lockstep=world > 1)
        if batch_index < len(batches):
            for i, tokens in zip(batch, outputs):
                mine[i] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    model.train(was_training)
    answers: dict[int, str] = {}
    for part in distributed.gather_objects(mine):
        answers.update(part)
    return [answers[i] for i in range(len(prompts))]


def sample_generations(model: nn.Module, tokenizer, rows: list[dict[str, str]], template: str,
                       max_new_tokens: int, device: torch.device, batch_size: int = 8,
                       max_prompt_tokens: int | None = None) -> list[dict[str, str]]:
    """A few held-out answers for the training log. Call on every rank with the same rows (it is
    a collective under ZeRO-3); returns [{instruction, input, reference, prediction}] on every rank."""
    prompts = [prompt_ids(tokenizer, row, template, max_prompt_tokens) for row in rows]
    predictions = generate(model, tokenizer, prompts, max_new_tokens, batch_size, device)
    return [{**row_texts(row), "prediction": prediction} for row, prediction in zip(rows, predictions)]
