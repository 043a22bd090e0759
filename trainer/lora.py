"""LoRA, ours: y = base(x) + scaling * B(A(dropout(x))), with A Kaiming-uniform and B zero.

One adapter per wrapped layer. The wrapped layer may be a plain `nn.Linear`, a bitsandbytes
`Linear4bit` or `Linear8bitLt`; it stays frozen and is kept under the name `base_layer`, so the
adapter's parameter names (`<path>.lora_A.weight`, `<path>.lora_B.weight`) are PEFT's.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ADAPTER_MARKERS = (".lora_A.", ".lora_B.")
# Dropout masks take one random byte per element, and 16 more bits only for the 1 in 256 elements
# whose byte falls on the drop probability's boundary: the probability is rounded to 1/2^24.
MASK_BITS = 24


class _MaskedLinear(torch.autograd.Function):
    """(x * keep) @ W^T for a boolean keep mask. Saves x and the mask, not the masked copy of x: q, k
    and v read the same x, so it is held once (when base and adapters share a dtype; otherwise each
    adapter converts x, and keeps its own copy). The mask is widened to x's dtype through uint8 before
    multiplying: multiplying by a bool tensor, or `where` on it, takes a type-promoting path several
    times slower on CPU."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, keep, weight)
        return F.linear(x * _widened(keep, x.dtype), weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        x, keep, weight = ctx.saved_tensors
        mask = _widened(keep, x.dtype)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight).mul_(mask)
        if ctx.needs_input_grad[2]:
            kept = x * mask
            grad_weight = grad.reshape(-1, grad.shape[-1]).t() @ kept.reshape(-1, kept.shape[-1])
        return grad_x, None, grad_weight


def _widened(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return keep.view(torch.uint8).to(dtype)


class _LoRADown(nn.Linear):
    """lora_A, with dropout given as a boolean keep mask (see `_MaskedLinear`). A module of its own,
    so ZeRO-3 gathers A when it runs."""

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        if keep is None:
            return F.linear(x, self.weight)
        return _MaskedLinear.apply(x, keep, self.weight)


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
    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = dropout
        # Adapters are created in fp32. Under DeepSpeed with bf16 on, the engine casts them to bf16 for
        # compute and keeps an fp32 master copy in the optimizer; outside it they compute in fp32.
        self.lora_A = _LoRADown(self.in_features, r, bias=False, device=_device_of(base_layer), dtype=torch.float32)
        self.lora_B = _LoRAUp(r, self.out_features, bias=False, device=_device_of(base_layer), dtype=torch.float32)
        self.merged = False
        self.reset_adapter()

    def reset_adapter(self) -> None:
        # B = 0 makes the adapted layer start exactly at the base layer.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        adapter_dtype, scaling = self.lora_A.weight.dtype, self.scaling
        x, keep = x.to(adapter_dtype), None
        if self.training and self.dropout > 0:
            # Inverted dropout, its 1 / keep-probability folded into the scaling.
            keep, keep_probability = dropout_keep_mask(x, self.dropout)
            scaling = scaling / keep_probability
        h = self.lora_A(x, keep)
        if result.dtype == adapter_dtype:
            return self.lora_B(h, base=result, alpha=scaling)
        return result + (self.lora_B(h) * scaling).to(result.dtype)  # e.g. a bf16 base, fp32 adapters (no DeepSpeed)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold B @ A * scaling into the base weight. A quantised base is dequantised first and
        kept in 16/32-bit afterwards: re-quantising would throw the adapter's update away."""
        if self.merged:
            return
        if not isinstance(self.base_layer, nn.Linear) or _is_quantised(self.base_layer):
            self.base_layer = dequantised_linear(self.base_layer)
        weight = self.base_layer.weight
        weight.data += self.delta_weight().to(weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again. A base that was quantised stays dequantised."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.data -= self.delta_weight().to(weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout:g}, merged={self.merged}"


def dropout_keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A boolean mask shaped like x, True with probability 1 - p (p rounded to 1/2^24), from
    torch's generator; and that keep probability.

    With p * 2^24 = boundary * 2^16 + rest, an element is dropped when its random byte is below
    `boundary`, or equal to it and 16 further random bits are below `rest`. On CPU the comparisons
    run in numpy, which does them about ten times faster than torch does on one thread."""
    dropped = round(p * 2**MASK_BITS)  # p <= 0.99 (the recipe's limit): boundary stays below 256
    boundary, rest = divmod(dropped, 2**16)
    levels = _random(x.numel(), torch.uint8, x.device)
    keep = (_keep_in_numpy if x.device.type == "cpu" else _keep_in_torch)(levels, boundary, rest)
    return keep.view(x.shape), 1 - dropped / 2**MASK_BITS


def _keep_in_numpy(levels: torch.Tensor, boundary: int, rest: int) -> torch.Tensor:
    byte = levels.numpy()
    keep = byte >= boundary
    ties = np.flatnonzero(byte == boundary) if rest else ()
    if len(ties):  # the 16 further bits come as int16: at or above rest - 2^15 is at or above `rest`
        keep[ties] = _random(len(ties), torch.int16, levels.device).numpy() >= rest - 2**15
    return torch.from_numpy(keep)


def _keep_in_torch(levels: torch.Tensor, boundary: int, rest: int) -> torch.Tensor:
    keep = levels >= boundary
    if rest:
        keep &= (levels != boundary) | (_random(levels.numel(), torch.int16, levels.device) >= rest - 2**15)
    return keep


def _random(count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`count` uniform integers of `dtype` (uint8 or int16) from torch's generator, several per
    64-bit draw."""
    per_word = 8 // dtype.itemsize
    words = torch.empty((count + per_word - 1) // per_word, dtype=torch.int64, device=device)
    return words.random_(-2**63, 2**63 - 1).view(dtype)[:count]


def _device_of(layer: nn.Module) -> torch.device:
    return next(layer.parameters()).device


def _is_quantised(layer: nn.Module) -> bool:
    return type(layer).__name__ in ("Linear4bit", "Linear8bitLt")


def dequantised_weight(layer: nn.Module) -> torch.Tensor:
    """The base layer's weight as a float tensor, whatever its storage."""
    name = type(layer).__name__
    if name == "Linear4bit":
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    if name == "Linear8bitLt":
        import bitsandbytes.functional as bnb_functional

        scales = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
        return bnb_functional.int8_vectorwise_dequant(layer.weight.data, scales)
    return layer.weight.data


def dequantised_linear(layer: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    weight = dequantised_weight(layer)
    dtype = dtype or getattr(layer, "compute_dtype", None) or torch.float32
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                       device=weight.device, dtype=dtype)
    linear.weight.data.copy_(weight.to(dtype))
    if layer.bias is not None:
        linear.bias.data.copy_(layer.bias.data.to(dtype))
    linear.weight.requires_grad_(False)
    if linear.bias is not None:
        linear.bias.requires_grad_(False)
    return linear


def apply_lora(model: nn.Module, target_modules: list[str], r: int, alpha: float,
               dropout: float = 0.0, rslora: bool = False) -> list[str]:
    """Freeze `model` and wrap every linear layer whose last name is in `target_modules`.
    Returns the wrapped module paths; raises if nothing matched (a typo would train nothing)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    wrapped = []
    for path, module in list(model.named_modules()):
        leaf = path.rsplit(".", 1)[-1]
        if leaf not in target_modules or isinstance(module, LoRALinear):
            continue
        if not hasattr(module, "in_features") or not hasattr(module, "out_features"):
            continue
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, LoRALinear(module, r, alpha, dropout, rslora))
        wrapped.append(path)
    if not wrapped:
        leaves = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if hasattr(m, "in_features")})
        raise ValueError(f"lora.target_modules={target_modules} matched no linear layer; "
                         f"the model's linear layers are named: {', '.join(leaves)}")
    return wrapped


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {path: module for path, module in model.named_modules() if isinstance(module, LoRALinear)}


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Adapter parameters by name, selected by structure (never the base)."""
    return {name: p for name, p in model.named_parameters() if any(m in name for m in ADAPTER_MARKERS)}


def merge_all(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.merge()


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
