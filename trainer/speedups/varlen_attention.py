"""Packed examples' attention on a GPU in one call: torch's variable-length flash attention
(`torch.nn.attention.varlen.varlen_attn`, CUDA, fp16/bf16), the examples given by their cumulative
lengths, where per-example SDPA (`packed_attention.py`) launches its kernels once per example and
layer, forward and backward.

It applies to the one joined row `CausalLMLoss` gives packed attention (the examples' lengths known on
the host), without dropout or a logit soft cap, on a torch that has the kernel. Anywhere else, and for
the rest of the run wherever the kernel refuses a setting (a GPU or dtype it does not support; said
once), attention runs per example as before. Each setting (device, dtype, heads, head size, window) is
tried first, forward and backward, on a small probe: a refusal in the backward would otherwise end the
step. The probe keeps out of activation checkpointing's bookkeeping (its recomputation skips the
probe), and a setting's verdict never changes within a run, so a recomputed layer takes the path the
layer took. Equal to per-example SDPA up to the kernels' rounding:
`tests/speedups/test_varlen_attention.py` checks that on CUDA (`make gpu-check`), and on CPU checks
the layout, lengths, window and grouped heads it passes against the kernel's documented contract.
"""
from __future__ import annotations

import functools
import inspect
import itertools
import warnings

import torch

from trainer.runtime.quiet import TrainerWarning

DEVICE_TYPES = ("cuda",)
DTYPES = (torch.float16, torch.bfloat16)
_verdicts: dict[tuple, bool] = {}  # a setting -> whether the kernel took it (its probe's forward and backward)
_bounds: tuple[tuple, torch.Tensor] | None = None  # the last lengths' cumulative bounds on the device: every layer reads them


def kernel():
    """torch's varlen_attn, or None on a torch without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def applies(query: torch.Tensor, dropout: float, softcap: float | None) -> bool:
    return (query.device.type in DEVICE_TYPES and query.dtype in DTYPES and query.shape[0] == 1
            and not dropout and softcap is None and kernel() is not None)


@functools.lru_cache(maxsize=4)
def _parameters(attend) -> frozenset[str]:
    """The kernel's parameter names (torch versions differ: is_causal, or window_size and enable_gqa)."""
    return frozenset(inspect.signature(attend).parameters)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: list[int],
              scaling: float | None, window: int | None) -> torch.Tensor | None:
    """query [1, heads, T, head_dim], key/value [1, kv_heads, T, head_dim] -> [1, T, heads, head_dim],
    causal within each example (and within the last `window` positions: key k for query q where
    q - window < k <= q, transformers' rule); None where the kernel refused (per-example attention then)."""
    attend = kernel()
    options = _parameters(attend)
    if "window_size" in options:  # (left, right) positions a query sees around itself; -1: unbounded
        extra = {"window_size": (-1 if window is None else window - 1, 0)}
    elif window is None and "is_causal" in options:
        extra = {"is_causal": True}
    else:
        return None
    grouped = key.shape[1] != query.shape[1]
    if grouped and "enable_gqa" in options:
        extra["enable_gqa"] = True
    elif grouped:
        key, value = (t.repeat_interleave(query.shape[1] // key.shape[1], dim=1) for t in (key, value))
    # [1, heads, T, head_dim] -> [T, heads, head_dim]: the projections' own layout, so no copy as a rule
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    if not _takes(attend, q, k, extra):
        return None
    bounds = cumulative_bounds(lengths, query.device)
    return attend(q, k, v, bounds, bounds, max(lengths), max(lengths), scale=scaling, **extra).unsqueeze(0)


def _takes(attend, q: torch.Tensor, k: torch.Tensor, extra: dict) -> bool:
    """Whether the kernel takes this setting: decided once per run, on the first call, by `_probe`."""
    setting = (q.device, q.dtype, q.shape[1], k.shape[1], q.shape[2], tuple(sorted(extra.items())))
    if setting not in _verdicts:
        try:
            _probe(attend, q, k, extra)
            _verdicts[setting] = True
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError, TypeError) as error:
            _verdicts[setting] = False
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            warnings.warn(TrainerWarning(f"variable-length attention refused this run's packed rows ({first}); their "
                                         f"attention runs one example at a time instead"), stacklevel=3)
    return _verdicts[setting]


def _probe(attend, q: torch.Tensor, k: torch.Tensor, extra: dict) -> None:
    """Forward and backward once on two short examples with these settings, so that a kernel whose
    backward refuses them (which no try around the forward would see) is found before training relies
    on it. Raises what the kernel raises. Its saved tensors bypass any saved-tensor hooks around the
    caller: activation checkpointing counts what a layer saves, and its recomputation runs no probe. Its
    inputs are fixed values, not random draws: a draw would move the device's random stream (dropout's)
    in a run's first step, so a resumed run, which probes again, would draw other masks than the
    uninterrupted one."""
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda kept: kept, lambda kept: kept):
        made = [torch.linspace(-1, 1, 5 * heads * q.shape[2], device=q.device, dtype=q.dtype)
                .reshape(5, heads, q.shape[2]).requires_grad_() for heads in (q.shape[1], k.shape[1], k.shape[1])]
        bounds = torch.tensor([0, 2, 5], dtype=torch.int32, device=q.device)
        attend(*made, bounds, bounds, 3, 3, **extra).float().sum().backward()


def cumulative_bounds(lengths: list[int], device: torch.device) -> torch.Tensor:
    """[0, l0, l0 + l1, ...] as int32 on `device`, copied there once per micro-batch, not once per layer."""
    global _bounds
    key = (tuple(lengths), device)
    if _bounds is None or _bounds[0] != key:
        _bounds = key, torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32).to(device)
    return _bounds[1]
