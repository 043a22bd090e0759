"""The fused SwiGLU and RMSNorm ops' passes over the activations as single loops, compiled by
torch.compile (inductor: C++ with the CPU's vector instructions) instead of one torch op per pass:
`train.compiled_kernels`.

Eager, `SiluMul` (trainer/speedups/fused.py) runs SiLU and the product as two passes forward, and
four backward (two of them computing the sigmoid again); RMSNorm runs about five forward and four
backward. Compiled, each direction is one loop that reads its inputs once: on SmolLM2's
[1546 x 1536] SiLU-times-up 2.4 against 7.0 ms forward and backward, and its [1546 x 576] RMSNorm 0.8
against 2.5 ms (one thread, this project's Xeon). The formulas are the same; the results differ
from eager's by float rounding (the exponential and the per-token sum are computed differently).

The first call in a process compiles (tens of seconds on one core, then kept in inductor's on-disk
cache, /tmp/torchinductor_<user>, for later processes); shapes are dynamic, so packed batches of new
lengths do not compile again. `None` (auto) turns it on for CPU training of bases at least
`AUTO_MIN_HIDDEN` wide, where the time saved per step soon repays the compile; the tests' tiny bases
stay eager. Where compiling fails (no C++ compiler, an unsupported torch build), the first call
says why once and every call runs eager: the same numbers up to rounding.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

AUTO_MIN_HIDDEN = 512  # SmolLM2-135M is 576 wide; the built-in tiny base 128


def wanted(setting: bool | None, device: torch.device, hidden_size: int) -> bool:
    """train.compiled_kernels: true or false as given; null (auto) on CPU for a base at least
    `AUTO_MIN_HIDDEN` wide."""
    if setting is not None:
        return setting
    return device.type == "cpu" and hidden_size >= AUTO_MIN_HIDDEN


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _silu_mul_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sigmoid = torch.sigmoid(gate)
    silu = gate * sigmoid
    # d silu(g) / dg = sigmoid(g) (1 + g (1 - sigmoid(g))) = sigmoid + silu (1 - sigmoid)
    return grad * up * (sigmoid + silu * (1 - sigmoid)), grad * silu


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype), rstd


def _rms_norm_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    # d/dx of x * rstd(x), applied to g = grad * weight: g * rstd - x * rstd^3 * (g . x) / hidden.
    x32 = x.float()
    g = (grad * weight).float()
    per_token = (g * x32).sum(-1, keepdim=True) * rstd.pow(3) / x.shape[-1]
    return (g * rstd - x32 * per_token).to(x.dtype)


class Kernel:
    """`function` compiled on first use (dynamic shapes), or `function` itself once compiling or
    running the compiled code has failed."""

    def __init__(self, function: Callable):
        self.function = function
        self.compiled: Callable | None = None
        self.failed = False

    def __call__(self, *args):
        if not self.failed:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.function, dynamic=True)
                return self.compiled(*args)
            except Exception as error:  # noqa: BLE001  (any failure: run eager, as without the option)
                self.failed = True
                log.warning("train.compiled_kernels: torch.compile of %s failed (%s: %s); running it eager "
                            "(the same numbers up to float rounding, slower)", self.function.__name__,
                            type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        return self.function(*args)


class Kernels:
    """The compiled loops, one set per process (`KERNELS`); pickled by name, so a model whose
    forwards hold it still pickles."""

    def __init__(self):
        self.silu_mul = Kernel(_silu_mul)
        self.silu_mul_backward = Kernel(_silu_mul_backward)
        self.rms_norm = Kernel(_rms_norm)
        self.rms_norm_backward = Kernel(_rms_norm_backward)

    def __reduce__(self):
        return _kernels, ()


KERNELS = Kernels()


def _kernels() -> Kernels:
    return KERNELS
