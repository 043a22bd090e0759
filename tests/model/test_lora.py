"""Our LoRA layer (trainer/model/lora.py) on plain, 4-bit and 8-bit linear layers: it starts at the base,
computes scaling * B A x, merges and unmerges exactly, trains only the adapters, and never merges as a
side effect of eval()."""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import RecipeError
from trainer.model.adapters import adapter_parameters, lora_layers, merge_all, unmerge_all
from trainer.model.dequantise import dequantised_weight
from trainer.model.lora import LoRALinear, apply_lora
from trainer.model.base_fixes import keep_4bit_layout


def quantised_linear(bits: int, source: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    if bits == 4:
        layer = bnb.nn.Linear4bit(source.in_features, source.out_features, bias=True,
                                  compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
        layer.weight = bnb.nn.Params4bit(source.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
    else:
        layer = bnb.nn.Linear8bitLt(source.in_features, source.out_features, bias=True, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(source.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    layer.bias = nn.Parameter(source.bias.data.clone(), requires_grad=False)
    keep_4bit_layout(layer)  # as load_base does: no bf16 repacking in eval mode on AVX512-BF16 CPUs
    return layer.to("cpu")


def base_layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    return linear if kind == "linear" else quantised_linear(4 if kind == "4bit" else 8, linear)


KINDS = ["linear", "4bit", "8bit"]


@pytest.mark.parametrize("kind", KINDS)
def test_b_starts_at_zero_so_output_equals_the_base(kind):
    base = base_layer(kind).eval()  # bnb's 8-bit layer computes differently in training mode
    x = torch.randn(5, 64)
    expected = base(x)
    layer = LoRALinear(base, r=8, alpha=16, dropout=0.1)
    layer.eval()
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert torch.count_nonzero(layer.lora_A.weight) > 0
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_update_is_scaling_times_b_a_x(kind):
    base = base_layer(kind)
    layer = LoRALinear(base, r=4, alpha=12)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 64)
    assert layer.scaling == 3.0
    expected = base(x) + 3.0 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_rslora_scaling_is_alpha_over_sqrt_r():
    layer = LoRALinear(nn.Linear(8, 8), r=16, alpha=32, rslora=True)
    assert layer.scaling == pytest.approx(32 / math.sqrt(16))


# How far the merged layer's output may be from the unmerged one. bitsandbytes' 8-bit forward also
# rounds its input to int8 (~1e-2 here), while the merged layer multiplies by the dequantised weight in
# fp32; the 4-bit forward dequantises its weight and computes in fp32, as a plain layer does.
MERGED_OUTPUT_TOLERANCE = {"linear": 1e-5, "4bit": 1e-5, "8bit": 3e-2}


@pytest.mark.parametrize("kind", KINDS)
def test_merge_adds_exactly_scaling_b_a_to_the_base_and_unmerge_takes_it_out(kind):
    base = base_layer(kind)
    layer = LoRALinear(base, r=8, alpha=16)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    layer.eval()
    x = torch.randn(7, 64)
    original = dequantised_weight(base).float().clone()  # merge adds in place: keep a copy
    update = (layer.lora_B.weight @ layer.lora_A.weight) * (16 / 8)
    assert update.abs().min() > 0
    unmerged = layer(x)
    tolerance = MERGED_OUTPUT_TOLERANCE[kind]

    layer.merge()
    assert layer.merged and type(layer.base_layer) is nn.Linear  # a quantised base is dequantised
    assert layer.base_layer.weight.dtype == torch.float32
    assert torch.equal(layer.base_layer.weight, original + update)  # one fp32 add: bitwise
    merged = layer(x)
    torch.testing.assert_close(merged, F.linear(x, original + update, base.bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=tolerance)

    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, original, rtol=0, atol=1e-6)  # (W + dW) - dW rounds
    torch.testing.assert_close(layer(x), unmerged, rtol=0, atol=tolerance)


def test_merge_all_and_unmerge_all_reach_every_adapted_layer():
    model = nn.Sequential()
    model.add_module("q_proj", base_layer("4bit"))
    model.add_module("v_proj", nn.Linear(48, 32))
    apply_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    layers = lora_layers(model)
    originals = {path: dequantised_weight(layer.base_layer).float().clone() for path, layer in layers.items()}
    for layer in layers.values():
        nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(5, 64)
    with torch.no_grad():
        unmerged = model(x)
        merge_all(model)
        for path, layer in layers.items():
            assert layer.merged, path
            assert torch.equal(layer.base_layer.weight, originals[path] + layer.delta_weight()), path
        torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-5)
        unmerge_all(model)
        for path, layer in layers.items():
            assert not layer.merged, path
            torch.testing.assert_close(layer.base_layer.weight, originals[path], rtol=0, atol=1e-6, msg=path)
        torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-5)


def test_merge_all_gives_an_8bit_layer_the_models_dtype():
    """bitsandbytes' 8-bit layer records no dtype: a bf16 model's merged layer is bf16, not fp32 (which
    its bf16 inputs could not go through)."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 64, dtype=torch.bfloat16)
            self.q_proj = base_layer("8bit")

        def get_input_embeddings(self):
            return self.embed

        def forward(self, ids):
            return self.q_proj(self.embed(ids))

    model = Model()
    apply_lora(model, ["q_proj"], r=4, alpha=8)
    layer = model.q_proj
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    expected = (dequantised_weight(layer.base_layer).float() + layer.delta_weight().float()).to(torch.bfloat16)
    with torch.no_grad():
        merge_all(model)
        assert layer.base_layer.weight.dtype == layer.base_layer.bias.dtype == torch.bfloat16
        assert torch.equal(layer.base_layer.weight, expected)
        assert model(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16
    single = LoRALinear(base_layer("8bit"), r=4, alpha=8)
    single.merge()  # no model to take a dtype from
    assert single.base_layer.weight.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_all_merges_an_embedding_adapter_too(dtype):
    """merge_all passes every adapter the model's dtype; the embedding's keeps its own weight's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).to(dtype).eval()
    apply_lora(model, ["q_proj", "embed_tokens"], r=4, alpha=8)
    embedding = model.model.embed_tokens
    with torch.no_grad():
        embedding.lora_embedding_A.normal_(std=0.3)
        for layer in lora_layers(model).values():
            if isinstance(layer, LoRALinear):
                layer.lora_B.weight.normal_(std=0.1)
    expected_weight = (embedding.base_layer.weight.float() + embedding.delta_weight().float()).to(dtype)
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        merge_all(model)
        assert all(layer.merged for layer in lora_layers(model).values())
        assert embedding.base_layer.weight.dtype == dtype
        assert torch.equal(embedding.base_layer.weight, expected_weight)
        tolerance = 1e-5 if dtype == torch.float32 else 0.1
        torch.testing.assert_close(model(input_ids=ids).logits, unmerged, rtol=0, atol=tolerance)


def test_merge_never_happens_as_a_side_effect_of_eval():
    base = nn.Linear(8, 8)
    weight = base.weight.detach().clone()
    layer = LoRALinear(base, r=2, alpha=4)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 8)
    layer.eval()
    out = layer(x)
    assert not layer.merged and layer.base_layer is base and torch.equal(base.weight, weight)
    expected = F.linear(x, weight, base.bias) + 2.0 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_only_adapter_parameters_train_and_get_gradients(kind):
    model = nn.Sequential()
    model.add_module("q_proj", base_layer(kind))
    model.add_module("other", nn.Linear(48, 4))
    wrapped = apply_lora(model, ["q_proj"], r=4, alpha=8)
    assert wrapped == ["q_proj"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"q_proj.lora_A.weight", "q_proj.lora_B.weight"} == set(adapter_parameters(model))
    nn.init.normal_(model.q_proj.lora_B.weight)
    model(torch.randn(2, 64)).sum().backward()
    assert model.q_proj.lora_A.weight.grad is not None and model.q_proj.lora_B.weight.grad is not None


def test_unknown_target_module_is_an_error_listing_the_real_names():
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(4, 4))
    model.add_module("v_proj", nn.Linear(4, 4))
    with pytest.raises(RecipeError, match="query matched no linear or embedding layer.*q_proj, v_proj"):
        apply_lora(model, ["query"], r=2, alpha=4)
    # One typo beside a name that matches: an error too, not that layer silently left untrained.
    with pytest.raises(RecipeError, match="lora.target_modules: v_prj matched no .* named: q_proj, v_proj$"):
        apply_lora(model, ["q_proj", "v_prj"], r=2, alpha=4)  # q_proj wrapped: not its base_layer, lora_A, lora_B
    # A saved adapter's list (strict=False): what matched is loaded; nothing matching is still an error.
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(4, 4))
    assert apply_lora(model, ["q_proj", "v_prj"], r=2, alpha=4, strict=False) == ["q_proj"]
    with pytest.raises(RecipeError, match="adapter_config.json: target_modules: query matched no"):
        apply_lora(nn.Sequential(nn.Linear(4, 4)), ["query"], r=2, alpha=4, strict=False,
                   named_in="adapter_config.json: target_modules")


def test_dropout_is_on_the_adapters_input_in_training_and_leaves_the_update_unbiased():
    # The masks trainer/speedups/dropout_masks.py swaps in for training: tests/speedups/test_dropout_masks.py.
    torch.manual_seed(0)
    assert isinstance(LoRALinear(nn.Linear(8, 8), r=2, alpha=4).lora_dropout, nn.Identity)  # p = 0
    layer = LoRALinear(nn.Linear(32, 16, bias=False).requires_grad_(False), r=4, alpha=8, dropout=0.25)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(6, 32)
    layer.eval()
    expected = layer(x)
    assert not torch.equal(layer.train()(x), expected)  # training drops
    mean = torch.stack([layer(x) for _ in range(4000)]).mean(0)
    update = expected - layer.base_layer(x)
    assert (mean - expected).norm() / update.norm() < 0.03  # inverted dropout: unbiased in expectation


def test_a_bf16_base_with_fp32_adapters_gives_the_update_and_gradients():
    torch.manual_seed(0)
    base = nn.Linear(32, 16, bias=False).to(torch.bfloat16).requires_grad_(False)
    layer = LoRALinear(base, r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = base(x).float() + 2.0 * (x.float() @ layer.lora_A.weight.t() @ layer.lora_B.weight.t())
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=5e-2)
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.abs().sum() > 0 and layer.lora_B.weight.grad.dtype == torch.float32


def test_a_4bit_base_keeps_its_layout_and_gradients_after_an_evaluation(small_base_path):
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight the first time the layer runs in
    eval mode without gradients; afterwards the layer passed no gradient to its input and
    dequantize_4bit misread the weight. load_base turns that repacking off (elsewhere this is a no-op)."""
    from trainer.recipe_loading import recipe_from_dict
    from trainer.model.base import load_base

    model, _ = load_base(recipe_from_dict({"model": {"name_or_path": small_base_path}, "quant": {"bits": 4}}),
                         torch.device("cpu"))
    layer = model.model.layers[0].mlp.up_proj
    weight = dequantised_weight(layer)
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.randint(3, 100, (2, 70)))
    model.train()
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(dequantised_weight(layer), weight)
    x = torch.randn(70, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, torch.ones(70, layer.out_features) @ weight, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_weight_decoded_into_bf16_is_the_fp32_decoding_rounded(bits):
    torch.manual_seed(0)
    layer = quantised_linear(bits, nn.Linear(64, 48))
    weight = dequantised_weight(layer, torch.bfloat16)
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight, dequantised_weight(layer).to(torch.bfloat16))
    assert dequantised_weight(layer, torch.float32).dtype == torch.float32


def test_merging_into_a_4bit_layer_that_computes_in_bf16_keeps_the_models_fp32():
    """quant.compute_dtype=bfloat16 under an fp32 model: the merged layer is fp32, like the model."""
    torch.manual_seed(0)
    layer = quantised_linear(4, nn.Linear(64, 48))
    layer.compute_dtype = torch.bfloat16
    adapted = LoRALinear(layer, r=4, alpha=8)
    nn.init.normal_(adapted.lora_B.weight)
    x = torch.randn(5, 64)
    expected = dequantised_weight(layer) + adapted.scaling * adapted.lora_B.weight @ adapted.lora_A.weight
    adapted.merge()
    assert adapted.base_layer.weight.dtype == torch.float32
    torch.testing.assert_close(adapted.base_layer.weight, expected, rtol=1e-5, atol=1e-5)
    assert adapted(x).dtype == torch.float32


def test_a_layer_whose_owner_passes_its_weight_to_a_kernel_is_refused():
    """Mamba-2's fused scan (GraniteMoeHybrid here) takes out_proj's weight itself, in training too: an
    adapter there would be skipped, and the forward failed with an AttributeError. in_proj, which it calls
    as a layer, and the attention layer's projections train."""
    import transformers

    config = transformers.GraniteMoeHybridConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, layer_types=["mamba", "attention"], mamba_d_state=16, mamba_n_heads=4,
        mamba_d_head=32, mamba_n_groups=1, shared_intermediate_size=64, num_local_experts=0)
    torch.manual_seed(0)
    model = transformers.GraniteMoeHybridForCausalLM(config)
    with pytest.raises(RecipeError, match=r"lora.target_modules: out_proj \(model.layers.0.mamba.out_proj\) is read "
                                          r"as a bare weight by GraniteMoeHybridMambaLayer"):
        apply_lora(model, ["q_proj", "out_proj"], r=4, alpha=8.0)
    model = transformers.GraniteMoeHybridForCausalLM(config)
    wrapped = apply_lora(model, ["in_proj", "q_proj", "o_proj"], r=4, alpha=8.0)
    assert wrapped == ["model.layers.0.mamba.in_proj", "model.layers.1.self_attn.q_proj",
                       "model.layers.1.self_attn.o_proj"]
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B.weight, std=0.1)
    ids = torch.randint(3, 96, (2, 12))
    model.train()(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_parameters(model).values())


def test_a_weight_read_without_being_passed_to_a_kernel_is_not_refused():
    """Bloom slices dense.weight only when slow_but_exact is on, and GPT-Neo's flash attention reads
    q_proj.weight.dtype: neither bypasses an adapter, so both adapt."""
    import transformers

    bloom = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=96, hidden_size=64, n_layer=1, n_head=4))
    assert "self.dense.weight[" in inspect.getsource(type(bloom.transformer.h[0].self_attention))
    assert apply_lora(bloom, ["query_key_value", "dense"], r=4, alpha=8.0) == [
        "transformer.h.0.self_attention.query_key_value", "transformer.h.0.self_attention.dense"]
    ids = torch.randint(3, 96, (2, 12))
    bloom.train()(input_ids=ids, labels=ids).loss.backward()
