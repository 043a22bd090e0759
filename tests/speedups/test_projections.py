"""q, k and v as one product (trainer/speedups/projections.py): the layers' own values and gradients,
the adapters' gradients too; each layer's own forward wherever it does not apply; a whole model's loss
and gradients as without it; the profile still sees its frozen and adapter parts."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.speedups.test_fused import lora_model, saved_bytes
from tests.test_loss import examples  # noqa: F401  (a fixture)
from trainer.data.packing import collate_packed
from trainer.loss import CausalLMLoss
from trainer.model.adapters import adapter_parameters
from trainer.model.lora import LoRALinear
from trainer.speedups import onednn, projections, rotary
from trainer.speedups.projections import QKV, SharedInputLinear

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this torch build has no oneDNN")


@pytest.fixture
def fused_calls(monkeypatch) -> list[int]:
    """How many `SharedInputLinear` forwards ran."""
    calls, forward = [0], SharedInputLinear.forward

    def counted(ctx, *args):
        calls[0] += 1
        return forward(ctx, *args)

    monkeypatch.setattr(SharedInputLinear, "forward", staticmethod(counted))
    return calls


def routed_model(small_base_path: str, library: str = onednn.TORCH, compute: torch.dtype = torch.float32,
                 dropout: float = 0.0) -> nn.Module:
    """The 2-layer GQA base (q 64 wide, k and v 32), 4-bit, LoRA r=4 on q, k, v, o with B != 0, its
    frozen layers routed by onednn.py."""
    model = lora_model(small_base_path, dropout=dropout)
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.compute_dtype = compute
    assert onednn.use_onednn_linear(model, library) > 0
    return model


def one_by_one_and_fused(attention: nn.Module, x: torch.Tensor, grads: list[torch.Tensor]):
    """Outputs and gradients (x's if it has one, then each adapter's A and B) both ways."""
    leaves = ([x] if x.requires_grad else []) + [p for name in QKV for p in getattr(attention, name).parameters()
                                                  if p.requires_grad]
    results = []
    for outputs in ([getattr(attention, name)(x) for name in QKV], projections.project(attention, QKV, x)):
        results.append((outputs, torch.autograd.grad(outputs, leaves, grads)))
    return results


@pytest.mark.parametrize("library", [onednn.TORCH, onednn.ONEDNN])
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_grad", [True, False])  # the first layer's input has none
def test_one_product_gives_the_layers_values_and_gradients(small_base_path, fused_calls, library, compute, x_grad):
    model = routed_model(small_base_path, library, compute)
    attention = model.model.layers[1].self_attn
    torch.manual_seed(1)
    x = torch.randn(1, 80, model.config.hidden_size, requires_grad=x_grad)
    widths = [getattr(attention, name).out_features for name in QKV]
    assert widths[1] < widths[0]  # grouped-query attention: k and v narrower than q
    grads = [torch.randn(1, 80, width) for width in widths]
    (expected, expected_grads), (got, got_grads) = one_by_one_and_fused(attention, x, grads)
    assert fused_calls[0] == 1
    assert len(got_grads) == 6 + x_grad and all(g is not None for g in got_grads)
    # fp32: the same products summed in another order. bf16: the products' inputs rounded alike, their
    # fp32 sums in another order.
    tolerance = 1e-5 if compute == torch.float32 else 1e-2
    for name, a, b in [*zip(QKV, got, expected), *zip(range(len(got_grads)), got_grads, expected_grads)]:
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float32, name
        scale = float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance * scale, msg=lambda m, name=name: f"{name}: {m}")


def test_where_it_does_not_apply_each_layer_runs_its_own_forward(small_base_path, fused_calls):
    model = routed_model(small_base_path)
    attention = model.model.layers[0].self_attn
    q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
    x = torch.randn(1, 80, model.config.hidden_size, requires_grad=True)
    small = torch.randn(1, onednn.MIN_ROWS - 1, model.config.hidden_size)

    def declined(x: torch.Tensor = x) -> None:
        torch.manual_seed(0)  # the same dropout masks both ways
        expected = [getattr(attention, name)(x) for name in QKV]
        torch.manual_seed(0)
        for got, want in zip(projections.project(attention, QKV, x), expected):
            assert torch.equal(got, want)
        assert fused_calls[0] == 0

    with torch.no_grad():  # evaluation and decoding: each layer's own numbers
        declined()
    declined(small)  # too few rows: the layers' own (bitsandbytes') path
    # A hook expects its module to be called: on a layer or any part of it, forward or backward, or global.
    def nothing(*args):
        return None

    for register in (k.register_forward_hook, q.lora_A.register_forward_pre_hook, q.lora_dropout.register_forward_hook,
                     v.register_full_backward_hook, torch.nn.modules.module.register_module_forward_hook):
        hook = register(nothing)  # one at a time
        declined()
        hook.remove()
    q.lora_magnitude_vector = nn.Parameter(q.weight_norm())  # DoRA
    declined()
    q.lora_magnitude_vector = None
    q.lora_A.weight.ds_id = 5  # a ZeRO-3 placeholder: DeepSpeed gathers it when lora_A is called
    declined()
    del q.lora_A.weight.ds_id
    q.lora_dropout = nn.Dropout(0.1)  # each adapter its own mask
    declined()
    q.lora_dropout = nn.Identity()
    k.base_layer.compute_dtype = torch.bfloat16  # products in two dtypes
    declined()
    k.base_layer.compute_dtype = torch.float32
    v.base_layer.__dict__.pop("forward")  # a layer no route was given
    declined()
    onednn.use_onednn_linear(v, onednn.ONEDNN)  # products by two libraries
    declined()
    onednn.use_onednn_linear(v, onednn.TORCH)
    projections.project(attention, QKV, x)
    assert fused_calls[0] == 1
    fused_calls[0] = 0
    q.merge()  # a merged layer: its base is a plain linear layer now, trained unless frozen again
    declined()


def test_a_model_trains_with_one_product_as_with_three(small_base_path, small_tokenizer, examples, fused_calls):  # noqa: F811
    batch = collate_packed(examples, 64, small_tokenizer.pad_token_id)
    results = {}
    for fused in (False, True):
        model = routed_model(small_base_path)
        assert rotary.use_fused_rotary(model, fused_qkv=fused) == model.config.num_hidden_layers
        assert len(projections.fused_layers(model)) == (3 * 5 * model.config.num_hidden_layers if fused else 0)  # layer, base, dropout, A, B
        (loss, _), saved = saved_bytes(lambda model=model: CausalLMLoss(model)(**batch),
                                    ignore=model)  # the fused op keeps the first layer's A, needing no input gradient
        loss.backward()
        results[fused] = loss.detach(), adapter_parameters(model), saved
    assert fused_calls[0] == model.config.num_hidden_layers
    (plain_loss, plain, plain_saved), (loss, params, saved) = results[False], results[True]
    # Nothing more kept for the backward (attention keeps v, which must not hold q and k with it); less,
    # by the adapters' inputs and hidden states held once rather than per layer.
    assert saved <= plain_saved, (saved, plain_saved)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=0)
    for name, parameter in plain.items():
        scale = float(parameter.grad.abs().max())
        torch.testing.assert_close(params[name].grad, parameter.grad, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


class Projections(nn.Module):
    """Three frozen layers with biases reading one input: q with an adapter (r=4, alpha 8) whose A
    is frozen, k without one, v with r=2, alpha 3."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = LoRALinear(nn.Linear(32, 48).requires_grad_(False), r=4, alpha=8)
        self.k_proj = nn.Linear(32, 16).requires_grad_(False)
        self.v_proj = LoRALinear(nn.Linear(32, 16).requires_grad_(False), r=2, alpha=3)
        for layer in (self.q_proj, self.v_proj):
            nn.init.normal_(layer.lora_B.weight)
        self.q_proj.lora_A.weight.requires_grad_(False)
        assert onednn.use_onednn_linear(self, onednn.TORCH) == 3


@pytest.mark.parametrize("checkpointed", [False, True])
def test_layers_without_adapters_ranks_scalings_biases_and_frozen_parts_get_their_gradients(fused_calls, checkpointed):
    from torch.utils.checkpoint import checkpoint

    module = Projections()
    x = torch.randn(3, 70, 64, requires_grad=True)[..., ::2]  # not contiguous
    grads = [torch.randn(3, 70, n) for n in (48, 16, 16)]
    leaves = [x, *(p for p in module.parameters() if p.requires_grad)]
    assert len(leaves) == 4  # x, q's B, v's A and B

    def run(fused: bool):
        def outputs(x):
            return tuple(projections.project(module, QKV, x) if fused else [getattr(module, n)(x) for n in QKV])
        got = checkpoint(outputs, x, use_reentrant=False) if checkpointed else outputs(x)
        return got, torch.autograd.grad(got, leaves, grads)

    (expected, expected_grads), (got, got_grads) = run(False), run(True)
    assert fused_calls[0] == 1 + checkpointed  # the recomputation takes the fused path again
    for a, b in zip([*got, *got_grads], [*expected, *expected_grads]):
        assert a.shape == b.shape
        # Sums over 210 rows in another order, of terms as large as the tensor's largest values (up to
        # ~190 here): one thread's MKL order left 2.2e-5 on an element of 0.13, by cancellation.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-7 * float(b.abs().max()) + 1e-5)


def test_frozen_layers_alone_keep_nothing_for_the_backward(fused_calls):
    module = Projections()
    for name in ("q_proj", "v_proj"):
        setattr(module, name, getattr(module, name).base_layer)
    x = torch.randn(100, 32, requires_grad=True)
    outputs, saved = saved_bytes(lambda: projections.project(module, QKV, x))
    assert fused_calls[0] == 1 and saved == 0
    (got,) = torch.autograd.grad(outputs, x, [torch.ones_like(o) for o in outputs])
    expected = sum(layer.weight.sum(0) for layer in (module.q_proj, module.k_proj, module.v_proj))
    torch.testing.assert_close(got, expected.expand_as(x), rtol=1e-5, atol=1e-5)


def test_what_the_backward_needs_is_all_that_is_kept(fused_calls):
    module = Projections()
    x = torch.randn(100, 32, requires_grad=True)
    outputs, saved = saved_bytes(lambda: projections.project(module, QKV, x), ignore=module)
    assert saved == x.untyped_storage().nbytes() + 100 * (4 + 2) * 4  # x for v's A, h for q's and v's B
    for layer in (module.q_proj, module.v_proj):  # A trained, B frozen: x, and no h
        layer.lora_A.weight.requires_grad_(True)
        layer.lora_B.weight.requires_grad_(False)
    outputs, saved = saved_bytes(lambda: projections.project(module, QKV, x), ignore=module)
    assert saved == x.untyped_storage().nbytes() and fused_calls[0] == 2


def test_layers_with_and_without_a_bias_run_one_by_one(fused_calls):
    module = Projections()
    module.k_proj.bias = None
    x = torch.randn(100, 32, requires_grad=True)
    for got, want in zip(projections.project(module, QKV, x), [getattr(module, name)(x) for name in QKV]):
        assert torch.equal(got, want)
    assert fused_calls[0] == 0


def test_the_profile_gives_the_fused_products_to_the_frozen_layers_and_lora(small_base_path, small_tokenizer,
                                                                             examples, fused_calls):  # noqa: F811
    from launch.benchmarks import profile as bench_profile

    model = routed_model(small_base_path)
    rotary.use_fused_rotary(model, fused_qkv=True)
    loss_model = CausalLMLoss(model)
    parts = bench_profile.Parts(loss_model, model)
    assert not any(m._forward_hooks for m in projections.fused_layers(model))  # hooked, they would not fuse
    parts.recording = True
    with torch.profiler.profile() as profiler:
        with torch.autograd.profiler.record_function(bench_profile.STEP):
            loss, _ = loss_model(**collate_packed(examples, 64, small_tokenizer.pad_token_id))
            loss.backward()
    assert fused_calls[0] == model.config.num_hidden_layers
    seconds = bench_profile.split(profiler.events(), parts.by_sequence_number())
    ranges = [e for e in profiler.events() if e.name in bench_profile.RANGES]
    assert {e.name for e in ranges} == set(bench_profile.RANGES)
    # Both ranges, forward and backward, on each layer, but for the first layer's backward frozen
    # product: its input (the embeddings) needs no gradient.
    assert len(ranges) == 4 * model.config.num_hidden_layers - 1
    assert seconds[bench_profile.FROZEN] > 0 and seconds[bench_profile.LORA] > 0
    o_proj = [m for m in model.modules() if isinstance(m, LoRALinear) and m not in projections.fused_layers(model)]
    assert o_proj and all(m._forward_hooks for m in o_proj)  # the layers outside still hooked


def test_where_adapters_have_dropout_nothing_is_fused_and_the_profile_hooks_every_layer(small_base_path):
    from launch.benchmarks import profile as bench_profile

    model = routed_model(small_base_path, dropout=0.1)
    rotary.use_fused_rotary(model, fused_qkv=True)
    assert projections.fused_attentions(model) == [] and projections.fused_layers(model) == set()
    bench_profile.Parts(CausalLMLoss(model), model)
    assert all(m._forward_hooks for m in model.modules() if isinstance(m, LoRALinear))
