"""Models whose forward changes the logits after lm_head (Granite divides by logits_scaling, Cohere
multiplies by logit_scale, Gemma 2 caps them with final_logit_softcapping): our loss, which runs the
decoder and the head itself, is still the model's own loss, with its gradients, on both paths (the
frozen head's hand-written gradient and autograd's); a setting it does not know is refused."""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _checkpoints import one_thread
from trainer import loss as loss_module
from trainer.data.batching import collate
from trainer.data.examples import IGNORE_INDEX, Example
from trainer.loss import LOGIT_TRANSFORMS, CausalLMLoss, chunked_cross_entropy, logit_transform
from trainer.model.base import ModelLoadError
from trainer.model.adapters import adapter_parameters, lora_layers
from trainer.model.lora import apply_lora

SIZE = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# (config class, model class, the setting, what logit_transform makes of it)
MODELS = {
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                dict(logits_scaling=4.0, embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.1),
                (0.25, None)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.25), (0.25, None)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(final_logit_softcapping=5.0, head_dim=16, attn_implementation="eager"), (1.0, 5.0)),
    # divides the decoder's output by logits_mup_width_multiplier (24 by default) before its head
    "inkling": ("InklingTextConfig", "InklingForCausalLM",
                dict(logits_mup_width_multiplier=4.0, head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2,
                     swa_head_dim=16, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                     n_shared_experts=1, d_rel=4, rel_extent=16, sliding_window_size=8), (0.25, None)),
}


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    yield from one_thread()


def tiny_model(kind: str, **extra) -> nn.Module:
    import transformers

    config_class, model_class, setting, _ = MODELS[kind]
    config = getattr(transformers, config_class)(**SIZE, **{**setting, **extra})
    torch.manual_seed(1)
    model = getattr(transformers, model_class)(config)
    with torch.no_grad():  # confident logits, so that a scale or a cap left out shows in the loss
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2:
                parameter.normal_(std=1.0 if "embed" in name else 0.3)
    torch.manual_seed(7)
    apply_lora(model, ["q_proj", "v_proj"], r=4, alpha=8.0)
    for layer in lora_layers(model).values():  # B != 0: gradients reach A as well as B
        nn.init.normal_(layer.lora_B.weight, std=0.1)
    return model.train()


def padded_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    examples = []
    for row, length in enumerate([30, 9, 21]):
        ids = torch.randint(3, 96, (length,), generator=generator).tolist()
        examples.append(Example(row, ids, [IGNORE_INDEX] * 4 + ids[4:]))
    batch = collate(examples, 0)
    batch.pop("row_ids")
    return batch


def loss_and_gradients(model: nn.Module, loss) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    value = loss()
    value.backward()
    return value.detach(), {name: p.grad.clone() for name, p in adapter_parameters(model).items()}


@pytest.mark.parametrize("path", ["frozen head", "autograd"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_the_loss_is_the_models_own_where_its_forward_changes_the_logits(kind, path, monkeypatch):
    if path == "autograd":  # as with an adapted or ZeRO-3-partitioned head
        monkeypatch.setattr(loss_module, "_frozen_plain_head", lambda head: False)
    model = tiny_model(kind)
    batch = padded_batch()
    loss_model = CausalLMLoss(model)
    assert (loss_model.logit_scale, loss_model.logit_softcap) == MODELS[kind][3]

    def ours():
        total, count = loss_model(**batch)
        return total / count

    reference, reference_gradients = loss_and_gradients(model, lambda: model(**batch).loss)
    value, gradients = loss_and_gradients(model, ours)
    torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-6)
    for name, gradient in reference_gradients.items():
        assert gradient.abs().sum() > 0, name
        torch.testing.assert_close(gradients[name], gradient, rtol=1e-4, atol=1e-6,
                                   msg=lambda message, name=name: f"{name}: {message}")
    loss_model.logit_scale, loss_model.logit_softcap = 1.0, None  # the head's output as is: another objective
    with torch.no_grad():
        assert abs(ours() - reference) > 0.1


@pytest.mark.parametrize("scale,softcap", [(0.25, None), (1.0, 5.0), (3.0, 2.0)])
@pytest.mark.parametrize("path,dtype", [("frozen head", torch.float32), ("frozen head", torch.bfloat16),
                                        ("kept", torch.float32), ("checkpointed chunks", torch.float32)])
def test_each_path_takes_the_map_and_its_derivative(scale, softcap, path, dtype, monkeypatch):
    """cross_entropy(softcap * tanh(scale * z / softcap)) on every path, with its gradient for the hidden
    states: by hand in FrozenHeadCrossEntropy (several row chunks here), by autograd otherwise."""
    monkeypatch.setattr(loss_module, "FUSED_LOGITS_PER_CHUNK", 7 * 50)
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False).to(dtype).requires_grad_(path != "frozen head")
    with torch.no_grad():
        head.weight.mul_(8)  # logits well into the cap's curve
    hidden = torch.randn(37, 16, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    keep_logits_up_to = 0 if path == "checkpointed chunks" else 10**6
    calls = []
    original = loss_module.FrozenHeadCrossEntropy.forward
    monkeypatch.setattr(loss_module.FrozenHeadCrossEntropy, "forward",
                        staticmethod(lambda ctx, *args: calls.append(1) or original(ctx, *args)))

    value, _ = chunked_cross_entropy(head, hidden, targets, 5, keep_logits_up_to, scale=scale, softcap=softcap)
    (value * 3.0).backward()
    assert bool(calls) == (path == "frozen head")
    expected_hidden = hidden.detach().clone().requires_grad_(True)
    logits = head(expected_hidden).float() * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    expected = F.cross_entropy(logits, targets, reduction="sum")
    (expected * 3.0).backward()
    tolerance = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(value, expected, **tolerance)
    torch.testing.assert_close(hidden.grad, expected_hidden.grad, **tolerance)


def test_without_a_setting_the_logits_are_the_heads():
    assert logit_transform(tiny_model("granite", logits_scaling=1.0)) == (1.0, None)
    assert logit_transform(tiny_model("gemma2", final_logit_softcapping=None)) == (1.0, None)


def test_a_setting_the_loss_does_not_know_is_refused_when_it_is_built():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**SIZE))
    assert logit_transform(model) == (1.0, None)
    model.config.final_logit_softcapping = 30.0  # as a model class not in LOGIT_TRANSFORMS might apply it
    with pytest.raises(ModelLoadError, match=r"LlamaForCausalLM sets final_logit_softcapping=30.0"):
        CausalLMLoss(model)


def test_a_head_cut_to_fewer_logits_is_refused():
    model = tiny_model("inkling")
    assert logit_transform(model) == (0.25, None)
    model.config.unpadded_vocab_size = 90  # Inkling's forward keeps logits[..., :90] of the head's 96
    with pytest.raises(ModelLoadError, match=r"unpadded_vocab_size=90 of its head's 96 logits"):
        CausalLMLoss(model)
    model.config.unpadded_vocab_size = 96
    assert logit_transform(model) == (0.25, None)


@pytest.mark.parametrize("name", sorted(LOGIT_TRANSFORMS))
def test_each_class_in_the_table_reads_its_setting_in_its_own_source(name):
    """A transformers upgrade that renames or drops a model's setting fails here, not in training."""
    import transformers

    _, attribute = LOGIT_TRANSFORMS[name]
    assert attribute in inspect.getsource(getattr(transformers, name))
