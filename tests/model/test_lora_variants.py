"""The adapter variants: DoRA (also on a 4-bit/8-bit base), LoRA+ and LoRA on the token embedding
(tied to the output projection or not). Each trains, merges, exports, resumes bitwise and loads in
peft with the logits we compute."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from _checkpoints import make_checkpoint, one_thread, our_model, through_peft, tiny_recipe
from test_lora import KINDS, base_layer
from trainer.model.adapters import adapter_parameters, lora_layers, optimizer_groups
from trainer.model.dequantise import dequantised_weight
from trainer.model.lora import LoRALinear, apply_lora
from trainer.model.lora_embedding import LoRAEmbedding

IDS = [1, 45, 67, 89, 120, 300, 13, 13, 500, 7]
VARIANT_TARGETS = "lora.target_modules=[q_proj,v_proj,embed_tokens]"


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    yield from one_thread()


def logits_of(model: nn.Module, ids: list[int] = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def dora_reference(layer: LoRALinear, x: torch.Tensor, detach_norm: bool = True,
                   base_output: torch.Tensor | None = None) -> torch.Tensor:
    """m / ||V|| * V x + bias, with V = W + scaling * B @ A from the dequantised base weight (and
    W x = `base_output` minus bias where given)."""
    weight = dequantised_weight(layer.base_layer).float()
    update = layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    norm = (weight + update).norm(dim=1)
    norm = norm.detach() if detach_norm else norm
    bias = layer.base_layer.bias
    wx = x @ weight.T if base_output is None else base_output - bias
    out = layer.lora_magnitude_vector / norm * (wx + x @ update.T)
    return out if bias is None else out + bias


def randomise(layer: LoRALinear | LoRAEmbedding) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        if isinstance(layer, LoRAEmbedding):
            layer.lora_embedding_A.normal_(std=0.3)
        else:
            layer.lora_B.weight.normal_(std=0.1)
        if layer.lora_magnitude_vector is not None:
            layer.lora_magnitude_vector.mul_(1 + 0.3 * torch.rand_like(layer.lora_magnitude_vector))


# ------------------------------------------------------------------------------ DoRA


@pytest.mark.parametrize("kind", KINDS)
def test_dora_starts_at_the_base_and_computes_m_times_the_normalised_weight(kind):
    base = base_layer(kind).eval()
    x = torch.randn(5, 64)
    expected = base(x)
    layer = LoRALinear(base, r=8, alpha=16, dora=True).eval()
    # m starts at the row norms of the (dequantised) base weight, so the layer starts at the base.
    torch.testing.assert_close(layer.lora_magnitude_vector, dequantised_weight(base).float().norm(dim=1))
    assert torch.equal(layer(x), expected)
    randomise(layer)
    # bitsandbytes' int8 matmul rounds the activations too: DoRA rescales its output, not x @ W^T.
    reference = dora_reference(layer, x, base_output=base(x) if kind == "8bit" else None)
    torch.testing.assert_close(layer(x), reference, rtol=1e-4, atol=1e-4)


def test_dora_treats_the_norm_as_a_constant_in_backward():
    layer = LoRALinear(base_layer("linear"), r=4, alpha=8, dora=True)
    randomise(layer)
    x = torch.randn(6, 64)
    trained = list(adapter_parameters(nn.ModuleDict({"q": layer})).values())
    assert len(trained) == 3  # magnitude, A, B
    ours = torch.autograd.grad(layer(x).square().sum(), trained)
    detached = torch.autograd.grad(dora_reference(layer, x).square().sum(), trained)
    through_norm = torch.autograd.grad(dora_reference(layer, x, detach_norm=False).square().sum(), trained)
    for mine, expected, other in zip(ours, detached, through_norm):
        torch.testing.assert_close(mine, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours[1], through_norm[1], rtol=1e-3)  # the detached norm is what we match


@pytest.mark.parametrize("kind", KINDS)
def test_dora_merge_equals_unmerged_output(kind):
    base = base_layer(kind)
    layer = LoRALinear(base, r=8, alpha=16, dora=True).eval()
    randomise(layer)
    x = torch.randn(7, 64)
    reference = dora_reference(layer, x).detach()  # on the dequantised weight, as the merge sees it
    if kind == "8bit":  # merged, x is no longer rounded to int8: looser than the int8 matmul's error
        reference = dora_reference(layer, x).detach()
    layer.merge()
    assert isinstance(layer.base_layer, nn.Linear)
    torch.testing.assert_close(layer(x), reference, rtol=1e-4, atol=1e-4)
    layer.unmerge()
    torch.testing.assert_close(layer(x), reference, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ embedding LoRA


@pytest.mark.parametrize("dora", [False, True])
def test_embedding_lora_starts_at_the_base_and_adds_scaled_rows_of_a_times_b(dora):
    torch.manual_seed(0)
    base = nn.Embedding(50, 16, padding_idx=3).requires_grad_(False)
    layer = LoRAEmbedding(base, r=4, alpha=8, dora=dora)
    assert torch.count_nonzero(layer.lora_embedding_A) == 0 and torch.count_nonzero(layer.lora_embedding_B) > 0
    ids = torch.tensor([[1, 3, 7, 7, 49]])
    assert torch.equal(layer(ids), base(ids))
    randomise(layer)
    update = (layer.lora_embedding_B @ layer.lora_embedding_A).T * layer.scaling  # [vocab, dim]
    expected = base.weight + update
    if dora:  # rescaled per embedding dimension, the norm taken over the vocabulary
        expected = expected * (layer.lora_magnitude_vector / expected.norm(dim=0).detach())
    output = layer(ids)
    torch.testing.assert_close(output, expected[ids], rtol=1e-5, atol=1e-5)
    output.sum().backward()
    assert torch.count_nonzero(layer.lora_embedding_A.grad[:, 3]) == 0  # the padding token learns nothing
    assert torch.count_nonzero(layer.lora_embedding_A.grad[:, 7]) > 0
    layer.merge()
    torch.testing.assert_close(layer(ids), output.detach(), rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer(ids), output.detach(), rtol=1e-5, atol=1e-5)


def tied_model() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@pytest.mark.parametrize("dora", [False, True])
def test_tied_embeddings_adapt_the_input_side_only_and_merge_unties_them_for_export_and_peft(tmp_path, dora):
    from transformers import AutoModelForCausalLM

    from trainer.evaluation.export import merge_to_plain

    model = tied_model()
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    head = model.lm_head.weight.detach().clone()
    apply_lora(model, ["embed_tokens", "q_proj"], r=4, alpha=8, dora=dora)
    for layer in lora_layers(model).values():
        randomise(layer)
        if isinstance(layer, LoRALinear):
            with torch.no_grad():
                layer.lora_B.weight.normal_(std=0.1)
    expected = logits_of(model)
    assert (expected - logits_of(AutoModelForCausalLM.from_pretrained(base_dir).eval())).abs().max() > 1e-3
    assert torch.equal(model.lm_head.weight, head)  # the output projection is the base's

    recipe = tiny_recipe("lora.target_modules=[embed_tokens,q_proj]", "lora.r=4", "lora.alpha=8", "lora.dropout=0",
                         f"lora.dora={str(dora).lower()}")
    peft_model = through_peft(model, recipe, base_dir, tmp_path / "adapter")  # our checkpoint layout, read by peft
    torch.testing.assert_close(logits_of(peft_model), expected, rtol=1e-5, atol=1e-5)

    merged = merge_to_plain(model)
    out = tmp_path / "merged"
    merged.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    fresh = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(fresh.lm_head.weight, head)
    torch.testing.assert_close(logits_of(fresh), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ LoRA+


def test_lora_plus_puts_b_in_its_own_group_and_keeps_the_ratio_in_adams_first_step():
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(16, 8))
    model.add_module("embed_tokens", nn.Embedding(20, 16))
    apply_lora(model, ["q_proj", "embed_tokens"], r=2, alpha=4, dora=True)
    plain = optimizer_groups(model, 1.0)
    assert len(plain) == 1 and plain[0]["params"] == list(adapter_parameters(model).values())
    groups = optimizer_groups(model, 16.0)
    names = {id(p): n for n, p in adapter_parameters(model).items()}
    assert sorted(names[id(p)] for p in groups[1]["params"]) == ["embed_tokens.lora_embedding_B", "q_proj.lora_B.weight"]
    assert len(groups[0]["params"]) == 4 and groups[1]["lr_ratio"] == 16.0  # A, A, and the two magnitudes
    optimizer = torch.optim.AdamW(groups, lr=1.0, weight_decay=0.0)
    for group in optimizer.param_groups:  # what the loop does every step
        group["lr"] = 1e-3 * group.get("lr_ratio", 1.0)
    before = {id(p): p.detach().clone() for g in groups for p in g["params"]}
    for p in adapter_parameters(model).values():
        p.grad = torch.ones_like(p)
    optimizer.step()  # Adam's first step moves every element by lr (times g / |g| = 1)
    for group, step in zip(groups, (1e-3, 16e-3)):
        for p in group["params"]:
            torch.testing.assert_close((p.detach() - before[id(p)]).abs().max().item(), step, rtol=1e-3, atol=0)


def test_plus_ratio_must_be_positive():
    from trainer.config import RecipeError

    with pytest.raises(RecipeError, match="lora.plus_ratio"):
        tiny_recipe("lora.plus_ratio=0")


# ------------------------------------------------------------------------------ checkpoints, export, peft


@pytest.mark.parametrize("dora", [False, True])
def test_peft_loads_a_variant_adapter_with_equal_logits(tmp_path, tiny_base, dora):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    overrides = ["quant.bits=16", VARIANT_TARGETS, f"lora.dora={str(dora).lower()}", "lora.rslora=true"]
    adapter = make_checkpoint(tmp_path / "run", *overrides)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["use_dora"] is dora and "embed_tokens" in config["target_modules"]
    ours = logits_of(our_model(tiny_recipe(*overrides), adapter))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32),
                                           adapter).eval()
    torch.testing.assert_close(logits_of(peft_model), ours, rtol=1e-5, atol=1e-5)
    base_logits = logits_of(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval())
    assert (ours - base_logits).abs().max() > 1e-2  # the adapter did something


@pytest.mark.parametrize("bits", [4, pytest.param(8, marks=pytest.mark.slow)])
def test_a_variant_adapter_on_a_quantised_base_exports_to_the_model_it_trained(tmp_path, tiny_base, bits):
    from trainer.evaluation.export import load_merged

    overrides = [f"quant.bits={bits}", VARIANT_TARGETS, "lora.dora=true"]
    adapter = make_checkpoint(tmp_path / "run", *overrides)
    recipe = tiny_recipe(*overrides)
    merged = load_merged(recipe, adapter)
    assert not any(isinstance(m, (LoRALinear, LoRAEmbedding)) for m in merged.modules())
    difference = (logits_of(merged) - logits_of(our_model(recipe, adapter))).abs().max().item()
    if bits == 4:
        assert difference < 1e-4
    else:  # bitsandbytes' int8 matmul rounds the activations: the base alone differs from its merge as much
        from trainer.evaluation.export import merge_to_plain
        from trainer.model.base import load_base

        base, _ = load_base(recipe, torch.device("cpu"))
        base_logits = logits_of(base.eval())
        base_difference = (logits_of(merge_to_plain(base)) - base_logits).abs().max().item()
        assert difference < 2 * base_difference + 1e-4, (difference, base_difference)


# ------------------------------------------------------------------------------ 2 ranks, resume


@pytest.mark.distributed
@pytest.mark.slow  # the default suite resumes two ranks bitwise in test_resume.py
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_dora_lora_plus_and_embedding_lora_resume_bitwise_on_two_ranks(tmp_path, tiny_base, stage):
    """All three variants at once on the 4-bit base: ZeRO shards the magnitudes and the embedding
    adapter, LoRA+ makes two optimizer groups, and a resumed run continues bitwise."""
    from tests.checkpoint.test_resume import assert_same_tensors, losses, resume_from_copy, train

    settings = (f"deepspeed.zero_stage={stage}", "lora.dropout=0.1", "lora.dora=true", "lora.plus_ratio=16",
                VARIANT_TARGETS)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, *settings)
    resume_from_copy(straight, 3, resumed)
    result = train(resumed, *settings, "resume=auto")
    assert "at step 3" in result.stdout
    assert losses(resumed) == {step: loss for step, loss in losses(straight).items() if step > 3}
    final = straight / "checkpoints" / "step-6"
    assert_same_tensors(final, resumed / "checkpoints" / "step-6", "adapter_model.safetensors")
    assert_same_tensors(final, resumed / "checkpoints" / "step-6", "optimizer.safetensors")
    from safetensors.torch import load_file

    weights = load_file(str(final / "adapter_model.safetensors"))
    moments = load_file(str(final / "optimizer.safetensors"))  # both groups' Adam state, every parameter
    assert set(moments) == {f"{key}.{moment}" for key in weights for moment in ("exp_avg", "exp_avg_sq")}
    magnitude = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    assert weights[magnitude].shape == (128,) and "base_model.model.model.embed_tokens.lora_embedding_A" in weights
    # Trained: the magnitudes moved away from the base's row norms and the embedding's A from zero.
    from trainer.model.base import load_base

    base, _ = load_base(tiny_recipe(), torch.device("cpu"))
    initial = LoRALinear(base.model.layers[0].self_attn.q_proj, r=16, alpha=32, dora=True)
    assert (weights[magnitude] - initial.lora_magnitude_vector).abs().max() > 1e-4
    assert weights["base_model.model.model.embed_tokens.lora_embedding_A"].abs().max() > 0


def test_the_analysis_reads_a_dora_and_embedding_adapter_as_its_linear_b_a(tmp_path, tiny_base):
    from trainer.analysis.loading import load_adapter

    adapter = make_checkpoint(tmp_path / "run", VARIANT_TARGETS, "lora.dora=true")
    modules = load_adapter(adapter).modules
    assert len(modules) == 8 and not any("embed_tokens" in name for name in modules)  # q, v in 4 layers
