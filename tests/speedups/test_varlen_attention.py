"""Packed attention through one variable-length flash attention call (trainer/speedups/varlen_attention.py):
on CPU against a stand-in for torch's kernel that follows its documented contract (the layout, the
cumulative lengths, the window and grouped heads we pass it), a refusal falling back to per-example
attention once and for all, and on CUDA (make gpu-check) the real kernel against per-example SDPA."""
from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import nn

from trainer.runtime.quiet import TrainerWarning
from trainer.speedups import varlen_attention
from trainer.speedups.packed_attention import packed_sdpa_attention

LENGTHS = [5, 1, 12, 7]


def contract(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
             window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """torch.nn.attention.varlen.varlen_attn as its docstring describes it, one example at a time:
    [T, heads, head_dim] in and out; query q sees key k where q - left <= k <= q + right (-1: no bound)."""
    assert cu_seq_q.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k) and query.dim() == 3
    bounds = cu_seq_q.tolist()
    assert max_q == max_k == max(end - start for start, end in zip(bounds, bounds[1:]))
    assert enable_gqa or key.shape[1] == query.shape[1]
    left, right = window_size
    outputs = []
    for start, end in zip(bounds, bounds[1:]):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        if enable_gqa:
            k, v = (t.repeat_interleave(q.shape[0] // k.shape[0], dim=0) for t in (k, v))
        offset = torch.arange(end - start)[None, :] - torch.arange(end - start)[:, None]  # key - query
        allowed = ((left < 0) | (offset >= -left)) & ((right < 0) | (offset <= right))
        scores = (q @ k.transpose(1, 2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
        outputs.append((scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).transpose(0, 1))
    return torch.cat(outputs)


def older_contract(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None,
                   scale=None):
    """A torch whose varlen_attn has is_causal and neither window_size nor enable_gqa."""
    return contract(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                    window_size=(-1, 0) if is_causal else (-1, -1))


def inputs(heads: int, kv_heads: int, dtype=torch.float64, device="cpu"):
    generator = torch.Generator().manual_seed(0)
    total = sum(LENGTHS)
    made = [torch.randn(1, count, total, 8, generator=generator, dtype=dtype).to(device).requires_grad_()
            for count in (heads, kv_heads, kv_heads)]
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None].to(device)
    return made, positions


def attend(made, positions, window=None):
    output, _ = packed_sdpa_attention(nn.Module(), *made, None, scaling=0.3, position_ids=positions,
                                      packed_lengths=LENGTHS, sliding_window=window)
    gradients = torch.autograd.grad((output * torch.linspace(-1, 1, output.numel(), dtype=output.dtype,
                                                              device=output.device).view_as(output)).sum(), made)
    return output, gradients


@pytest.fixture
def on_cpu(monkeypatch):
    """The kernel's path taken on CPU in float64, with `kernel` the stand-in given."""
    monkeypatch.setattr(varlen_attention, "DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(varlen_attention, "DTYPES", (torch.float64,))
    monkeypatch.setattr(varlen_attention, "_verdicts", {})

    def use(stand_in):
        calls = []

        @functools.wraps(stand_in)  # its signature, which varlen_attention reads
        def counted(*args, **kwargs):
            calls.append(kwargs)
            return stand_in(*args, **kwargs)
        monkeypatch.setattr(varlen_attention, "kernel", lambda: counted)
        return calls
    return use


def per_example(made, positions, window=None, monkeypatch=None):
    with monkeypatch.context() as patch:
        patch.setattr(varlen_attention, "DEVICE_TYPES", ())
        return attend(made, positions, window)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("window,stand_in", [(None, contract), (4, contract), (None, older_contract)])
def test_one_call_gives_what_attention_per_example_gives(on_cpu, monkeypatch, heads, kv_heads, window, stand_in):
    made, positions = inputs(heads, kv_heads)
    calls = on_cpu(stand_in)
    output, gradients = attend(made, positions, window)
    attend(made, positions, window)
    assert len(calls) == 3  # the first call's probe (forward and backward on two short examples), then one a call
    expected_output, expected_gradients = per_example(made, positions, window, monkeypatch)
    assert output.shape == (1, sum(LENGTHS), heads, 8)
    torch.testing.assert_close(output, expected_output, rtol=1e-10, atol=1e-12)
    for got, expected in zip(gradients, expected_gradients):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_an_older_kernel_is_not_given_a_window_it_cannot_take(on_cpu):
    made, positions = inputs(4, 4)
    calls = on_cpu(older_contract)
    attend(made, positions, window=4)
    assert calls == []


def test_a_refusing_kernel_is_said_once_and_left_for_the_rest_of_the_run(on_cpu, monkeypatch):
    @functools.wraps(contract)
    def refusing(*args, **kwargs):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.\nmore detail")

    made, positions = inputs(6, 2)
    calls = on_cpu(refusing)
    with pytest.warns(TrainerWarning, match=r"variable-length attention refused this run's packed rows "
                                            r"\(FlashAttention only supports Ampere GPUs or newer\.\)"):
        output, gradients = attend(made, positions)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attend(made, positions)
    assert len(calls) == 1
    expected_output, expected_gradients = per_example(made, positions, monkeypatch=monkeypatch)
    torch.testing.assert_close(output, expected_output, rtol=0, atol=0)


class NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("window_size is not supported in the backward")


def test_the_probe_draws_no_random_numbers(on_cpu):
    """A resumed run probes again in its first step: a draw there would move dropout's random stream."""
    made, positions = inputs(6, 2)
    on_cpu(contract)
    torch.manual_seed(7)
    attend(made, positions)  # the first call: probe and layer
    after = torch.rand(4)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(4))


def test_a_kernel_whose_backward_refuses_is_found_before_training_relies_on_it(on_cpu, monkeypatch):
    @functools.wraps(contract)
    def forward_only(*args, **kwargs):
        return NoBackward.apply(contract(*args, **kwargs))

    made, positions = inputs(6, 2)
    calls = on_cpu(forward_only)
    with pytest.warns(TrainerWarning, match=r"\(window_size is not supported in the backward\)"):
        output, gradients = attend(made, positions)  # its backward runs: per-example attention's
    assert len(calls) == 1  # the probe's
    expected_output, expected_gradients = per_example(made, positions, monkeypatch=monkeypatch)
    torch.testing.assert_close(output, expected_output, rtol=0, atol=0)
    for got, expected in zip(gradients, expected_gradients):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_it_stands_aside_for_fp32_dropout_softcap_and_cpu():
    query = torch.zeros(1, 2, 4, 8, dtype=torch.bfloat16)
    assert not varlen_attention.applies(query, 0.0, None)  # CPU
    meta = torch.empty(1, 2, 4, 8, dtype=torch.bfloat16, device="meta")
    original = varlen_attention.DEVICE_TYPES
    try:
        varlen_attention.DEVICE_TYPES = ("meta",)
        assert varlen_attention.applies(meta, 0.0, None) == (varlen_attention.kernel() is not None)
        assert not varlen_attention.applies(meta.float(), 0.0, None)
        assert not varlen_attention.applies(meta, 0.1, None)
        assert not varlen_attention.applies(meta, 0.0, 30.0)
    finally:
        varlen_attention.DEVICE_TYPES = original


def test_under_activation_checkpointing_the_probe_is_not_counted_and_the_gradients_agree(on_cpu, monkeypatch):
    """The probe runs in the first forward, not in the checkpoint's recomputation: had its saved tensors
    gone through the checkpoint's hooks, the two would not match (torch raises CheckpointError)."""
    from torch.utils.checkpoint import checkpoint

    made, positions = inputs(6, 2)
    calls = on_cpu(contract)

    def layer(*tensors):
        return packed_sdpa_attention(nn.Module(), *tensors, None, scaling=0.3, position_ids=positions,
                                     packed_lengths=LENGTHS)[0]

    output = checkpoint(layer, *made, use_reentrant=False)
    gradients = torch.autograd.grad(output.pow(2).sum(), made)
    assert len(calls) == 3  # the probe's forward, the layer's, and its recomputation's
    expected = layer(*made)
    for got, wanted in zip(gradients, torch.autograd.grad(expected.pow(2).sum(), made)):
        torch.testing.assert_close(got, wanted, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available() or varlen_attention.kernel() is None,
                    reason="needs CUDA and torch's varlen_attn (make gpu-check runs it)")
@pytest.mark.parametrize("heads,kv_heads,window", [(4, 4, None), (6, 2, None), (6, 2, 4)])
def test_cuda_the_kernel_gives_what_sdpa_per_example_gives(monkeypatch, heads, kv_heads, window):
    monkeypatch.setattr(varlen_attention, "_verdicts", {})
    made, positions = inputs(heads, kv_heads, torch.bfloat16, "cuda")
    real, calls = varlen_attention.kernel(), []

    @functools.wraps(real)
    def counted(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(varlen_attention, "kernel", lambda: counted)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainerWarning)  # a refusal fails the test, not falls back
        output, gradients = attend(made, positions, window)
    assert len(calls) == 2  # the probe and the layer: the kernel ran, not per-example attention
    expected_output, expected_gradients = per_example(made, positions, window, monkeypatch)
    torch.testing.assert_close(output, expected_output, rtol=2e-2, atol=2e-2)
    for got, expected in zip(gradients, expected_gradients):
        torch.testing.assert_close(got, expected, rtol=5e-2, atol=5e-2)
