"""A model's LoRA adapters together: found by structure (their layers, their parameters by name),
as optimizer groups (LoRA+), merged into or out of the base all at once, and counted for the log."""
from __future__ import annotations

import math

import torch
from torch import nn

from trainer.model.lora import LoRALinear
from trainer.model.lora_embedding import LoRAEmbedding

ADAPTER_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector")
# LoRA+: the parameters that learn `plus_ratio` times faster (B of linear and embedding adapters).
PLUS_MARKERS = (".lora_B.", ".lora_embedding_B")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear | LoRAEmbedding]:
    return {path: module for path, module in model.named_modules()
            if isinstance(module, (LoRALinear, LoRAEmbedding))}


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Adapter parameters by name, selected by structure (never the base)."""
    return {name: p for name, p in model.named_parameters() if any(m in name for m in ADAPTER_MARKERS)}


def optimizer_groups(model: nn.Module, plus_ratio: float = 1.0) -> list[dict]:
    """The adapter parameters as optimizer groups. LoRA+ (Hayou et al. 2024): B learns `plus_ratio`
    times faster than A. Each group carries its `lr_ratio`; the loop sets lr = schedule x lr_ratio
    every step, so the ratio holds through warmup and decay. plus_ratio 1: one group, plain LoRA."""
    parameters = adapter_parameters(model)
    if plus_ratio == 1.0:
        return [{"params": list(parameters.values()), "lr_ratio": 1.0}]
    faster = {name for name in parameters if any(marker in name for marker in PLUS_MARKERS)}
    return [{"params": [p for name, p in parameters.items() if name not in faster], "lr_ratio": 1.0},
            {"params": [p for name, p in parameters.items() if name in faster], "lr_ratio": float(plus_ratio)}]


def link_group_states(engine_optimizer) -> None:
    """With several groups (LoRA+), DeepSpeed ZeRO-1/2 links each parameter's view of the Adam state
    right after the *first* group's first step, before the others have any state, and never again:
    saving then finds no moments for B. Linking is cheap (views), so link again after every step."""
    if getattr(engine_optimizer, "_hp_optimizer_states_linked", None) is None:
        return  # ZeRO-0 or ZeRO-3: nothing linked lazily
    if len(engine_optimizer.optimizer.param_groups) > 1 and engine_optimizer.optimizer.state:
        engine_optimizer._hp_optimizer_states_linked = False
        engine_optimizer._lazy_init_hp_params_optimizer_state()


def ties_adapted_layer(model: nn.Module) -> bool:
    """Whether the input embedding and the output projection share one weight and either of them
    is adapted: merging then unties them (the adapted side merges into a copy of its own), and the
    merged model must say tie_word_embeddings=false."""
    if not (hasattr(model, "get_input_embeddings") and hasattr(model, "get_output_embeddings")):
        return False
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    if embedding is None or output is None:
        return False
    adapted = isinstance(embedding, LoRAEmbedding) or isinstance(output, LoRALinear)
    embedding_weight = getattr(embedding, "weight", None)  # LoRAEmbedding.weight is its base's
    output_weight = getattr(output.base_layer if isinstance(output, LoRALinear) else output, "weight", None)
    return adapted and embedding_weight is not None and embedding_weight is output_weight


def merge_all(model: nn.Module) -> None:
    """Merge every adapter; a quantised layer that records no dtype becomes the input embedding's."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    dtype = embedding.weight.dtype if embedding is not None and embedding.weight.is_floating_point() else None
    for layer in lora_layers(model).values():
        layer.merge(dtype)


def unmerge_all(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def parameter_summary(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(_logical_numel(p) for p in model.parameters())
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)"


def _logical_numel(parameter: torch.Tensor) -> int:
    # A 4-bit weight is stored packed two values per byte; count the weights it stands for.
    quant_state = getattr(parameter, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return math.prod(quant_state.shape)
    return parameter.numel()
