"""The lean training ops give the same numbers as plain autograd, and hold no more for the backward:
the fused SwiGLU MLP and RMSNorm (trainer/speedups/fused.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.recipe_loading import recipe_from_dict
from trainer.data.examples import IGNORE_INDEX
from trainer.speedups.fused import PLAIN_RMSNORMS, RMSNormFunction, SiluMul, use_fused_mlp, use_fused_norm
from trainer.model.adapters import adapter_parameters, lora_layers
from trainer.model.lora import apply_lora
from trainer.loss import CausalLMLoss
from trainer.model.base import load_base
from trainer.data.packing import collate_packed
from trainer.speedups import last_layer
from trainer.speedups.packed_attention import use_packed_attention
from tests.test_loss import examples  # noqa: F401  (a fixture)


def saved_bytes(run, ignore: nn.Module | None = None) -> tuple[object, int]:
    """Bytes of distinct storages autograd keeps for the backward while `run()` builds the graph; not
    counting `ignore`'s parameters (which cost nothing extra to keep), if given."""
    storages = {}
    parameters = {p.untyped_storage().data_ptr() for p in ignore.parameters()} if ignore is not None else set()

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in parameters:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return result, sum(storages.values())


def test_silu_mul_is_autograds_silu_times_up_in_value_and_gradients():
    torch.manual_seed(0)
    gate, up = torch.randn(3, 5, 7, requires_grad=True), torch.randn(3, 5, 7, requires_grad=True)
    grad = torch.randn(3, 5, 7)
    (expected_gate, expected_up), expected = torch.autograd.grad(F.silu(gate) * up, (gate, up), grad), F.silu(gate) * up
    out = SiluMul.apply(gate, up)
    fused_gate, fused_up = torch.autograd.grad(out, (gate, up), grad)
    assert torch.equal(out, expected)
    assert torch.equal(fused_gate, expected_gate) and torch.equal(fused_up, expected_up)


def lora_model(small_base_path: str, fused: tuple[str, ...] = (), dropout: float = 0.0) -> nn.Module:
    model, _ = load_base(recipe_from_dict({"model": {"name_or_path": small_base_path}, "quant": {"bits": 4}}),
                         torch.device("cpu"))
    torch.manual_seed(0)
    apply_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"], r=4, alpha=8.0, dropout=dropout)
    for layer in lora_layers(model).values():  # B != 0: gradients reach A as well as B
        nn.init.normal_(layer.lora_B.weight, std=0.1)
    if "mlp" in fused:
        assert use_fused_mlp(model) == model.config.num_hidden_layers
    if "norm" in fused:
        assert use_fused_norm(model) == 2 * model.config.num_hidden_layers + 1
    use_packed_attention(model)
    last_layer.attach(model)
    return model.train()


def test_fused_ops_keep_loss_and_adapter_gradients_and_save_less(small_base_path, small_tokenizer, examples):  # noqa: F811
    batch = collate_packed(examples, 64, small_tokenizer.pad_token_id)
    results = {}
    for fused in ((), ("mlp",), ("mlp", "norm")):
        model = lora_model(small_base_path, fused)
        (loss_sum, _), saved = saved_bytes(lambda model=model: CausalLMLoss(model)(**batch))
        loss_sum.backward()
        results[fused] = loss_sum.detach(), adapter_parameters(model), saved
    plain_loss, plain_params, plain_saved = results[()]
    for fused, (loss, params, _) in results.items():
        assert torch.equal(loss, plain_loss), fused
        for name, parameter in plain_params.items():
            # The MLP runs autograd's kernels; the norms' backward sums in another order: float rounding.
            scale = float(parameter.grad.abs().max())
            tolerance = {"rtol": 1e-4, "atol": 1e-5 * scale} if "norm" in fused else {"rtol": 1e-5, "atol": 1e-7}
            torch.testing.assert_close(params[name].grad, parameter.grad, **tolerance,
                                       msg=lambda message, name=name: f"{fused} {name}: {message}")
    # One [tokens x intermediate] fp32 tensor less per MLP; the last layer's MLP sees the trained tokens
    # only. The fused norms keep no more than autograd's (x and one number per token, in fp32).
    config = model.config
    tokens = int(batch["segment_lengths"].sum())
    trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    expected_saving = ((config.num_hidden_layers - 1) * tokens + trained) * config.intermediate_size * 4
    mlp_saved = results[("mlp",)][2]
    assert plain_saved - mlp_saved >= 0.9 * expected_saving, (plain_saved, mlp_saved, expected_saving)
    assert results[("mlp", "norm")][2] <= mlp_saved


def test_only_known_plain_swiglu_mlps_with_silu_are_changed():
    def mlp(class_name: str, activation: nn.Module) -> nn.Module:
        module = type(class_name, (nn.Module,), {"__module__": "transformers.models.llama.modeling_llama"})()
        module.gate_proj, module.up_proj, module.down_proj = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4)
        module.act_fn = activation
        return module

    # Same parts, but an unknown class may scale or clamp in its forward (e.g. Falcon-H1's multipliers).
    assert use_fused_mlp(nn.Sequential(mlp("FalconH1MLP", nn.SiLU()), mlp("LlamaMLP", nn.GELU()))) == 0
    assert use_fused_mlp(nn.Sequential(mlp("LlamaMLP", nn.SiLU()))) == 1
    # A class of the same name from a model's own code (trust_remote_code) may compute something else.
    remote = mlp("LlamaMLP", nn.SiLU())
    type(remote).__module__ = "transformers_modules.someone.modeling_custom"
    assert use_fused_mlp(remote) == 0


@pytest.mark.parametrize("dtype, weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("train_weight", [False, True])
def test_rms_norm_function_is_llamas_rms_norm_in_value_and_gradients(dtype, weight_dtype, train_weight):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(48, eps=1e-5).to(weight_dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
    norm.weight.requires_grad_(train_weight)
    x = (3 * torch.randn(2, 9, 48) + 0.5).to(dtype).requires_grad_()
    grad = torch.randn(2, 9, 48).to(dtype)
    inputs = (x, norm.weight) if train_weight else (x,)
    expected = norm(x)
    expected_grads = torch.autograd.grad(expected, inputs, grad)
    out = RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon)
    grads = torch.autograd.grad(out, inputs, grad)
    assert out.dtype == expected.dtype and torch.equal(out, expected)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for got, reference in zip(grads, expected_grads):
        assert got.dtype == reference.dtype
        torch.testing.assert_close(got, reference, **tolerance)


def test_only_norms_computed_as_llamas_are_changed():
    import importlib
    import inspect

    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    # Gemma scales by (1 + weight) and Olmo2 applies the weight before the cast: not LlamaRMSNorm's numbers.
    assert use_fused_norm(nn.Sequential(GemmaRMSNorm(8), Olmo2RMSNorm(8))) == 0
    assert use_fused_norm(nn.Sequential(LlamaRMSNorm(8), nn.LayerNorm(8))) == 1
    # A class of the same name from a model's own code (trust_remote_code) may compute something else.
    remote = type("LlamaRMSNorm", (LlamaRMSNorm,), {"__module__": "transformers_modules.someone.modeling_custom"})
    assert use_fused_norm(remote(8)) == 0
    # Every norm on the list computes exactly what LlamaRMSNorm does, in this transformers version.
    modules = {"LlamaRMSNorm": "llama", "MistralRMSNorm": "mistral", "MixtralRMSNorm": "mixtral",
               "Qwen2RMSNorm": "qwen2", "Qwen2MoeRMSNorm": "qwen2_moe", "Qwen3RMSNorm": "qwen3",
               "GraniteRMSNorm": "granite", "Phi3RMSNorm": "phi3"}
    assert set(modules) == set(PLAIN_RMSNORMS)
    for name, module in modules.items():
        norm = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)
        assert inspect.getsource(norm.forward) == inspect.getsource(LlamaRMSNorm.forward), name
