"""Speed-ups, switched on in one place: `apply(model, recipe, device)`. Importing them changes nothing.

    fused.py             SwiGLU MLP and RMSNorm that keep less for the backward (train.fused_mlp, fused_norm)
    compiled.py          those two ops' passes as single loops compiled by torch.compile (train.compiled_kernels)
    rotary.py            Llama's rotary embedding in fewer passes (train.fused_rotary)
    projections.py       q, k and v as one product, their adapters' A as one, in CPU training (train.fused_qkv)
    onednn.py            the frozen layers' CPU products: input gradient only, through the faster of oneDNN
                         and MKL for this CPU (4-bit ones in bf16 under quant.compute_dtype=bfloat16);
                         oneDNN's caches capped (train.onednn_matmul)
    packed_attention.py  attention per packed example, not through a mask (data.packing, SDPA models)
    blocked_attention.py its CPU kernel: blocks of queries by the keys up to them, softmax kept (train.blocked_attention)
    varlen_attention.py  its GPU kernel in fp16/bf16: torch's variable-length flash attention, one call per layer
    dropout_masks.py     LoRA dropout from random bytes; q, k and v keep their input once (lora.dropout > 0)
    last_layer.py        the last layer's output projection and MLP at trained positions only (always)
    malloc.py            glibc malloc settings: before torch is imported, so launch/train.py applies them

None changes what is computed beyond float rounding; the dropout masks draw from the same
distribution as `nn.Dropout`, other random numbers.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from trainer.config import Recipe


def apply(model: nn.Module, recipe: Recipe, device: torch.device, *, training: bool = True) -> list[str]:
    """Switch on, in `model` (LoRA already applied) and this process, the speed-ups `recipe` asks
    for. Returns what was switched on, for the log. Call before `CausalLMLoss(model)` runs and before
    `trainer.data.packing.training_collate`, which picks the batch layout for the attention set here.

    `training=False` (evaluation, decoding): only the frozen layers' products and the last-layer
    hooks. The fused ops save memory for a backward, packed attention serves packed batches, and
    dropout is off."""
    # Imported here, not on top: launch/train.py imports trainer.speedups.malloc before torch.
    from trainer.speedups import (blocked_attention, compiled, dropout_masks, fused, last_layer, onednn, packed_attention,
                                  projections, rotary, varlen_attention)

    switched = []
    cpu = device.type == "cpu"
    if getattr(model, "use_kernels", False):
        # transformers with the `kernels` package installed loads models with hub kernels on, and
        # then re-kernelizes at every train()/eval() switch: that puts back the class's own forward
        # of each layer the hub has a name for (LlamaRMSNorm: "RMSNorm"), over the one bound below.
        # Off here, once, before anything is bound (turning it off resets to the torch forwards).
        model.use_kernels = False
    # First, before any oneDNN product in this process: its caches read their capacity then. On CPU
    # whatever train.onednn_matmul says: torch runs some of its own CPU products (16-bit) through oneDNN.
    if cpu and onednn.cap_caches():
        switched.append(f"oneDNN caches capped at {onednn.CACHE_CAPACITY} entries")
    kernels = None
    if training and compiled.wanted(recipe.train.compiled_kernels, device, getattr(model.config, "hidden_size", 0)):
        kernels = compiled.KERNELS
    loops = ", compiled loops" if kernels else ""
    if training and recipe.train.fused_mlp and (count := fused.use_fused_mlp(model, kernels)):
        switched.append(f"fused SwiGLU MLP ({count} layers{loops})")
    if training and recipe.train.fused_norm and (count := fused.use_fused_norm(model, kernels)):
        switched.append(f"fused RMSNorm ({count} norms{loops})")
    # Not under ZeRO-3: DeepSpeed partitions the layers after this, and gathers each one around its own call.
    qkv = cpu and recipe.train.fused_qkv and recipe.train.onednn_matmul and recipe.deepspeed.zero_stage != 3
    if training and recipe.train.fused_rotary and (count := rotary.use_fused_rotary(model, qkv)):
        switched.append(f"fused rotary embedding ({count} attention layers)")
    if cpu and recipe.train.onednn_matmul:
        library = onednn.faster_library()
        if count := onednn.use_onednn_linear(model, library):
            bf16 = "" if recipe.quant.compute_dtype != "bfloat16" else ", the 4-bit ones' in bf16"
            switched.append(f"frozen linear layers' products through {library}{bf16} ({count} layers)")
    if training and (count := len(projections.fused_attentions(model))):  # with the routes set above
        switched.append(f"q, k and v as one product ({count} attention layers)")
    if training and recipe.data.packing and model.config._attn_implementation == "sdpa":
        blocked = cpu and recipe.train.blocked_attention
        packed_attention.use_packed_attention(model, blocked)
        switched.append("attention per packed example" + (
            f" (as blocked products where fp32, examples up to {blocked_attention.KEEP_SCORES_UP_TO} tokens)" if blocked
            else " (one variable-length flash attention call per layer where fp16/bf16)"
            if not cpu and varlen_attention.kernel() is not None else ""))
    if training and (count := dropout_masks.use_dropout_masks(model)):
        switched.append(f"byte-drawn dropout masks ({count} adapters)")
    if last_layer.attach(model):
        switched.append("last layer at trained positions only")
    return switched
