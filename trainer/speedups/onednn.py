"""The frozen base's linear layers and the vocabulary projection on CPU: one autograd op each
(`FrozenLinear`: the input's gradient only), their fp32 products through the faster of oneDNN and MKL
for this CPU, or, for 4-bit layers with quant.compute_dtype=bfloat16, in bf16.

torch's x86 CPU wheels run `mm`/`linear` through MKL. On an AMD EPYC with AVX-512 it runs the bench
job's products at 70-95 GFLOP/s on one thread, the rate of AVX2 kernels (MKL's dispatch favours Intel
processors). oneDNN, which the same wheels carry (`torch.ops.mkldnn`), picks them from the
instruction set alone: the same shapes ([2600 x 128] by [128 x 352], [1300 x 128] by
[128 x 1001], and their backward products) run 2.3-2.7x faster, small ones ([48 x 128] by
[128 x 352]) ~1.3x. Same fp32 arithmetic; the sums run in another order, so results differ from
MKL's by float rounding. The adapters stay on torch's own products: at rank 16 oneDNN wins little
there, and loses on the weight gradient and on addmm.

On Intel processors MKL runs its own AVX-512 kernels, and there it is the faster of the two: on this
project's Intel Xeon (AVX-512) MKL ran every product of the SmolLM2 job 8-20% faster than oneDNN
([1400 x 576] by [576 x 576]: 133 against 119 GFLOP/s). `faster_library()` picks by the processor's
vendor; the frozen layers then still take `FrozenLinear` (the input's gradient alone, the 4-bit weight
dequantised in each pass rather than held), with torch's own product.

Only float32 CPU inputs take this path; anything else (GPU, a bf16 model, a ZeRO-3 partitioned
weight, a weight that is being trained outside the adapters) falls back to what the layer does
without it. A 4-bit layer whose compute dtype is bf16 (quant.compute_dtype=bfloat16 under an fp32
model) decodes its weight straight into bf16 and multiplies in bf16, fp32 in and out, as
bitsandbytes' own forward does: on a CPU with AMX tiles (this project's Xeon: `amx_bf16`) one thread
runs those products at ~1,300 GFLOP/s against ~160 in fp32. `train.onednn_matmul=false` turns it off.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from trainer.model.dequantise import dequantised_weight


# oneDNN's primitive cache and ideep's (torch's oneDNN wrapper) each keep an entry per product
# shape, ~0.3 MB apiece, and their default capacity is 1024. Packed micro-batches give every step
# new row counts, so with the defaults a run grew by ~13 MB per step (300 MB in the bench's 23
# steps). One micro-step uses ~14 shapes (7 products forward, 7 backward), reused across its
# layers: 16 entries keep that reuse and hold the memory flat. Both are read from the environment at
# oneDNN's first use in the process: `cap_caches()` must come before it.
CACHE_CAPACITY = 16
CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
# Below this many rows, dequantising and calling oneDNN costs more than bitsandbytes' own fused 4-bit
# op (48 rows without gradients: 166 against 103 us): decoding stays on the layers' own paths.
MIN_ROWS = 64


def cap_caches() -> list[str]:
    """Set `CACHE_VARIABLES` to `CACHE_CAPACITY` in this process's environment, where not set already
    (a value already there wins). Returns the names it set."""
    missing = [name for name in CACHE_VARIABLES if name not in os.environ]
    for name in missing:
        os.environ[name] = str(CACHE_CAPACITY)
    return missing


def available() -> bool:
    """Whether this torch build has oneDNN's linear op and oneDNN is enabled."""
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _takes(x: torch.Tensor, weight_dtype: torch.dtype) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and weight_dtype == torch.float32 and 0 < x.numel() and x.numel() >= MIN_ROWS * x.shape[-1]
            and not torch.is_autocast_enabled("cpu"))  # autocast decides the dtype itself


ONEDNN, TORCH = "oneDNN", "torch (MKL)"


def faster_library(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The library whose fp32 products are faster on this CPU: torch's own (MKL) on Intel processors,
    where MKL dispatches to its AVX-512 kernels; oneDNN elsewhere (AMD, or no /proc/cpuinfo to read)."""
    try:
        with open(cpuinfo) as handle:
            intel = any(line.startswith("vendor_id") and "GenuineIntel" in line for line in handle)
    except OSError:
        intel = False
    return TORCH if intel or not available() else ONEDNN


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias), like F.linear but without autograd: through oneDNN for fp32 CPU
    tensors, F.linear otherwise. `weight` may be a transposed view."""
    if not (torch.backends.mkldnn.enabled and _takes(x, weight.dtype)):
        return F.linear(x, weight, bias)
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
    return out.view(*x.shape[:-1], weight.shape[0])


Product = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
PRODUCTS: dict[str, Product] = {ONEDNN: linear, TORCH: F.linear}


class FrozenLinear(torch.autograd.Function):
    """y = x @ W^T + b for a weight and bias that are not trained, by `product` (`linear`, F.linear, or
    `_product_in` a 16-bit dtype):
    the backward returns the input's gradient only. `weight_of()` gives W; it is called again in the
    backward instead of keeping W, so a dequantised 4-bit weight is not held between the forward and
    the backward (as bitsandbytes' own matmul does)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_of: Callable[[], torch.Tensor], bias: torch.Tensor | None,
                product: Product) -> torch.Tensor:
        ctx.weight_of, ctx.product = weight_of, product
        return product(x, weight_of(), bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return ctx.product(grad, ctx.weight_of().t(), None), None, None, None


class Route(NamedTuple):
    """How a routed frozen layer multiplies an input: `product(x, weight_of(), bias)`, in `dtype`."""
    weight_of: Callable[[], torch.Tensor]
    bias: torch.Tensor | None
    product: Product
    library: str
    dtype: torch.dtype


def _binding(module: nn.Module) -> tuple[Callable, str] | None:
    """The forward `use_onednn_linear` bound to `module` and its library; None where it bound none."""
    forward = module.__dict__.get("forward")
    if isinstance(forward, functools.partial) and forward.func in ROUTES:
        return forward.func, forward.keywords.get("library", ONEDNN)
    return None


def routed(module: nn.Module) -> bool:
    """Whether `use_onednn_linear` gave `module` a route (taken or not, input by input)."""
    return _binding(module) is not None


def route(module: nn.Module, x: torch.Tensor) -> Route | None:
    """The route `use_onednn_linear` gave `module` for input `x`; None where it gave none, or where the
    layer takes its own forward for this x (not fp32 on the CPU, too few rows, a trained or ZeRO-3 weight)."""
    if (binding := _binding(module)) is None:
        return None
    forward, library = binding
    return ROUTES[forward](module, x, library)


def _plain_route(self: nn.Linear, x: torch.Tensor, library: str) -> Route | None:
    if _takes(x, self.weight.dtype) and _frozen(self.weight, self.bias):
        return Route(lambda: self.weight, self.bias, PRODUCTS[library], library, torch.float32)
    return None


def _linear4bit_route(self: nn.Module, x: torch.Tensor, library: str) -> Route | None:
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(self)
    state = self.weight.quant_state
    compute = self.compute_dtype or torch.float32
    # A weight bitsandbytes has repacked for its AVX512-BF16 kernel (not in a model from load_base,
    # which turns that off) is in a layout dequantize_4bit misreads: bitsandbytes' forward keeps it.
    # bitsandbytes' own forward (which runs where this declines: a few rows, decoding) casts a bias to
    # the compute dtype in place: such a bias still takes this path.
    if not (_takes(x, state.dtype) and _frozen(self.weight, self.bias, (torch.float32, compute))
            and not getattr(state, "packing_format_for_cpu", False)):
        return None
    if compute == torch.float32:
        return Route(lambda: dequantised_weight(self), self.bias, PRODUCTS[library], library, compute)
    # quant.compute_dtype=bfloat16 under an fp32 model: the products in bf16 (AMX tiles on a CPU
    # that has them), as bitsandbytes' own forward does, with fp32 in and out.
    return Route(lambda: dequantised_weight(self, compute), self.bias, functools.partial(_product_in, compute),
                 library, compute)


def _frozen_linear_forward(self: nn.Linear, x: torch.Tensor, library: str = ONEDNN) -> torch.Tensor:
    if (way := _plain_route(self, x, library)) is not None:
        return FrozenLinear.apply(x, way.weight_of, way.bias, way.product)
    return F.linear(x, self.weight, self.bias)


def _linear4bit_forward(self: nn.Module, x: torch.Tensor, library: str = ONEDNN) -> torch.Tensor:
    if (way := _linear4bit_route(self, x, library)) is not None:
        return FrozenLinear.apply(x, way.weight_of, way.bias, way.product)
    return type(self).forward(self, x)


ROUTES = {_frozen_linear_forward: _plain_route, _linear4bit_forward: _linear4bit_route}


def _product_in(dtype: torch.dtype, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight^T (+ bias) computed in `dtype` (`weight` already in it), returned in x's dtype."""
    return F.linear(x.to(dtype), weight, None if bias is None else bias.to(dtype)).to(x.dtype)


def _frozen(weight: torch.Tensor, bias: torch.Tensor | None, bias_dtypes: tuple = (torch.float32,)) -> bool:
    """A weight that is not trained and not a ZeRO-3 parameter (DeepSpeed gathers those around the
    layer's own forward and backward), and a bias, if any, that is not trained and in `bias_dtypes`."""
    return (not weight.requires_grad and not hasattr(weight, "ds_id")
            and (bias is None or (bias.dtype in bias_dtypes and not bias.requires_grad)))


def product_of(module: nn.Module) -> Product | None:
    """The product `use_onednn_linear` gave this plain linear layer (None: it was not routed)."""
    binding = _binding(module)
    return PRODUCTS[binding[1]] if binding is not None and binding[0] is _frozen_linear_forward else None


def use_onednn_linear(model: nn.Module, library: str = ONEDNN) -> int:
    """Route the frozen linear layers of `model` (bitsandbytes 4-bit ones and plain `nn.Linear`s
    whose weight is not trained, e.g. the vocabulary projection) through `FrozenLinear` with
    `library`'s product (`ONEDNN`, or `TORCH`: see `faster_library()`) for fp32 CPU inputs. Returns
    how many layers were changed; 0 when oneDNN is asked for and this torch build has none."""
    if library == ONEDNN and not available():
        return 0
    changed = 0
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes."):
            module.forward = functools.partial(_linear4bit_forward, module, library=library)
        elif type(module) is nn.Linear and not module.weight.requires_grad:
            module.forward = functools.partial(_frozen_linear_forward, module, library=library)
        else:
            continue
        changed += 1
    return changed
