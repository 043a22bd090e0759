"""LoRA, ours: y = base(x) + scaling * B(A(dropout(x))), with A Kaiming-uniform and B zero.

One adapter per wrapped layer. The wrapped layer may be a plain `nn.Linear`, a bitsandbytes
`Linear4bit` or `Linear8bitLt`; it stays frozen and is kept under the name `base_layer`, so the
adapter's parameter names (`<path>.lora_A.weight`, `<path>.lora_B.weight`) are PEFT's.

Variants: `dora=True` (DoRA, see trainer/model/dora.py) adds `<path>.lora_magnitude_vector`; an
`nn.Embedding` target is wrapped by `LoRAEmbedding` (trainer/model/lora_embedding.py); LoRA+ is only an
optimizer setting (`optimizer_groups`, trainer/model/adapters.py). A quantised base layer's weight is read
through trainer/model/dequantise.py.
"""
from __future__ import annotations

import functools
import inspect
import math
import re
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import RecipeError
from trainer.model.dequantise import dequantised_linear, dequantised_weight, is_quantised, recorded_dtype
from trainer.model.dora import dora_scale, full_parameters, kept_for_unmerge
from trainer.model.lora_embedding import LoRAEmbedding


class _LoRADown(nn.Linear):
    """lora_A: x @ A^T. A module of its own, so ZeRO-3 gathers A when it runs; a class of its own, so
    the speed-ups for frozen base layers (trainer/speedups/onednn.py) tell it from one."""


class _LoRAUp(nn.Linear):
    """lora_B: with `base` given, returns base + alpha * (h @ B^T) in one matrix multiply (no
    separate scale and add over the layer's output). A module of its own, so ZeRO-3 gathers B
    when it runs."""

    def forward(self, h: torch.Tensor, base: torch.Tensor | None = None, alpha: float = 1.0) -> torch.Tensor:
        if base is None:
            return F.linear(h, self.weight)
        out = torch.addmm(base.reshape(-1, self.out_features), h.reshape(-1, self.in_features), self.weight.t(),
                          alpha=alpha)
        return out.view(base.shape)


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dora: bool = False, shared_weight: bool = False):
        super().__init__()
        self.base_layer = base_layer
        # The base weight is also another module's (a tied lm_head): merge() then writes a copy.
        self.shared_weight = shared_weight
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        # On the adapter's input only: the base layer sees x as it is. For training,
        # trainer/speedups/dropout_masks.py swaps in one that draws cheaper masks.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Adapters are created in fp32. Under DeepSpeed with bf16 on, the engine casts them to bf16 for
        # compute and keeps an fp32 master copy in the optimizer; outside it they compute in fp32.
        self.lora_A = _LoRADown(self.in_features, r, bias=False, device=_device_of(base_layer), dtype=torch.float32)
        self.lora_B = _LoRAUp(r, self.out_features, bias=False, device=_device_of(base_layer), dtype=torch.float32)
        self.merged = False
        self._merged_norm: torch.Tensor | None = None
        self._merged_kept: tuple[torch.Tensor, torch.Tensor] | None = None  # see merge()
        self.reset_adapter()
        self.register_parameter("lora_magnitude_vector", None)
        if dora:  # B = 0: m = ||W||_row makes the layer start exactly at the base
            self.lora_magnitude_vector = nn.Parameter(self.weight_norm())

    def reset_adapter(self) -> None:
        # B = 0 makes the adapted layer start exactly at the base layer.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if getattr(self, "lora_magnitude_vector", None) is not None:
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(self.weight_norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        h = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))
        return self.add_update(result, h, self.scaling)

    def add_update(self, result: torch.Tensor, h: torch.Tensor, scaling: float) -> torch.Tensor:
        """The base layer's output plus the adapter's update, scaling * B h (h = A dropout(x))."""
        if self.lora_magnitude_vector is not None:
            return self._dora(result, h, scaling)
        if result.dtype == self.lora_A.weight.dtype:
            return self.lora_B(h, base=result, alpha=scaling)
        return result + (self.lora_B(h) * scaling).to(result.dtype)  # e.g. a bf16 base, fp32 adapters (no DeepSpeed)

    def _dora(self, result: torch.Tensor, h: torch.Tensor, scaling: float) -> torch.Tensor:
        """m / ||W + s B A|| * (W x + s B A x) + bias, written as a correction to the base output:
        result + (m / norm - 1) * (W x) + m / norm * s * B A x. Dropout acts on the adapter's input
        only (the base output is reused, not recomputed on dropped-out x as peft does in training)."""
        dtype = h.dtype
        scale = dora_scale(self.lora_magnitude_vector, self.weight_norm().to(dtype))
        bias = self.base_layer.bias
        base = (result if bias is None else result - bias).to(dtype)
        return result + ((scale - 1) * base + scale * (self.lora_B(h) * scaling)).to(result.dtype)

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """DoRA's ||W + scaling * B @ A|| per output row: float32, from the dequantised base weight,
        outside autograd (a constant in backward)."""
        with full_parameters(self.base_layer, self.lora_A, self.lora_B):
            weight = dequantised_weight(self.base_layer).float()
            weight = weight.addmm(self.lora_B.weight.float(), self.lora_A.weight.float(), alpha=self.scaling)
        return torch.linalg.vector_norm(weight, dim=1)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, in float32 whatever the adapters' dtype (a merge rounds it once, into W's)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self, dtype: torch.dtype | None = None) -> None:
        """Fold B @ A * scaling into the base weight. A quantised base is dequantised first and
        kept in 16/32-bit afterwards: re-quantising would throw the adapter's update away. It is merged
        in float32, then takes its model's dtype where it records it (4-bit), else `dtype` (bitsandbytes'
        8-bit layers record none: `merge_all` passes the model's), else stays float32.

        A base weight that another module shares (`shared_weight`: an lm_head tied to the input
        embedding, as SmolLM2's) is merged into a copy of its own: the embedding keeps the base
        weight, as it did in training, and the two are untied (see ties_adapted_layer)."""
        if self.merged:
            return
        cast = None
        if not isinstance(self.base_layer, nn.Linear) or is_quantised(self.base_layer):
            # Merged in float32, then cast: one rounding of W + dW, not two.
            cast = recorded_dtype(self.base_layer) or dtype
            self.base_layer = dequantised_linear(self.base_layer, torch.float32)
        if self.shared_weight:
            shared = self.base_layer.weight
            self.base_layer.weight = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
            self.shared_weight = False
        weight = self.base_layer.weight
        if self.lora_magnitude_vector is not None:  # W' = m / ||W + dW|| * (W + dW), per row
            self._merged_norm = self.weight_norm()
            factor = dora_scale(self.lora_magnitude_vector.float(), self._merged_norm)
            self._merged_kept = kept_for_unmerge(weight, factor, dim=0)  # rows the merge zeroes, for unmerge
            factor = factor[:, None]
            weight.data = (factor * (weight.float() + self.delta_weight().float())).to(weight.dtype)
        else:
            weight.data = (weight.float() + self.delta_weight()).to(weight.dtype)  # one rounding in a 16-bit W
        if cast is not None:
            self.base_layer.to(cast)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again. A base that was quantised stays dequantised."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        if self.lora_magnitude_vector is not None:
            factor = dora_scale(self.lora_magnitude_vector.float(), self._merged_norm)[:, None]
            restored = weight.float() / torch.where(factor != 0, factor, 1) - self.delta_weight().float()
            if self._merged_kept is not None:
                rows, values = self._merged_kept
                restored[rows] = values.float()
                self._merged_kept = None
            weight.data = restored.to(weight.dtype)
        else:
            weight.data = (weight.float() - self.delta_weight()).to(weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, "
                f"dora={self.lora_magnitude_vector is not None}, merged={self.merged}")


def _device_of(layer: nn.Module) -> torch.device:
    return next(layer.parameters()).device


def apply_lora(model: nn.Module, target_modules: list[str], r: int, alpha: float,
               dropout: float = 0.0, rslora: bool = False, dora: bool = False, strict: bool = True,
               named_in: str = "lora.target_modules") -> list[str]:
    """Freeze `model` and wrap every linear or embedding layer whose last name is in `target_modules`.
    Returns the wrapped module paths. Raises RecipeError, naming `named_in`, if a name matched no such
    layer (a typo would leave those layers untrained, or train nothing); `strict=False` (a saved
    adapter's list, which names the layers it has weights for): only if none matched."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    # Weights held by more than one module (tie_word_embeddings: lm_head and embed_tokens).
    holders = Counter(id(parameter) for _, parameter in model.named_parameters(remove_duplicate=False))
    wrapped, matched = [], set()
    for path, module in list(model.named_modules()):
        leaf = path.rsplit(".", 1)[-1]
        if isinstance(module, (LoRALinear, LoRAEmbedding)):
            matched.add(leaf)  # wrapped already
            continue
        if leaf not in target_modules:
            continue
        if isinstance(module, nn.Embedding):
            adapted = LoRAEmbedding(module, r, alpha, rslora, dora)
        elif hasattr(module, "in_features") and hasattr(module, "out_features"):
            refuse_weight_readers(model, path, named_in)
            shared = holders[id(getattr(module, "weight", None))] > 1
            adapted = LoRALinear(module, r, alpha, dropout, rslora, dora, shared_weight=shared)
        else:
            continue
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, adapted)
        wrapped.append(path)
        matched.add(leaf)
    missing = [name for name in target_modules if name not in matched]
    if missing and (strict or not matched):
        # The layers by their own names: an adapter's insides (base_layer, lora_A, lora_B) are no target.
        adapters = tuple(p + "." for p, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAEmbedding)))
        leaves = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules()
                         if (hasattr(m, "in_features") or isinstance(m, nn.Embedding)) and not p.startswith(adapters)}
                        - {""})
        raise RecipeError(f"{named_in}: {', '.join(missing)} matched no linear or embedding layer of "
                          f"this model; its layers are named: {', '.join(leaves)}")
    return wrapped


def refuse_weight_readers(model: nn.Module, path: str, named_in: str) -> None:
    """A layer whose owner passes its weight to a kernel itself (Mamba-2's fused scan takes out_proj's
    weight and bias as arguments, in training too) would skip the adapter, and a LoRALinear has no
    `.weight` to read: refused with what to do, instead of an AttributeError in the first forward. Only
    the weight given as an argument counts: reading its dtype, or slicing it in a branch that may never
    run (Bloom's slow_but_exact), is not a kernel skipping the adapter."""
    parent_path, _, child = path.rpartition(".")
    owner = type(model.get_submodule(parent_path) if parent_path else model)
    if re.search(rf"self\.{re.escape(child)}\.(weight|bias)\s*[,)]", _source(owner)):
        raise RecipeError(f"{named_in}: {child} ({path}) is read as a bare weight by {owner.__name__}'s own code "
                          f"(self.{child}.weight, passed to a fused kernel), which would skip an adapter there or "
                          f"fail on it; leave {child!r} out of {named_in}")


@functools.cache
def _source(owner: type) -> str:
    try:
        return inspect.getsource(owner)
    except (OSError, TypeError):  # a class defined at run time: nothing to read
        return ""
