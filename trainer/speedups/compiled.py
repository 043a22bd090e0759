"""The fused SwiGLU and RMSNorm ops' passes over the activations as single loops, compiled by
torch.compile (inductor: C++ with the CPU's vector instructions) instead of one torch op per pass:
`train.compiled_kernels`.

Eager, `SiluMul` (trainer/speedups/fused.py) runs SiLU and the product as two passes forward, and
four backward (two of them computing the sigmoid again); RMSNorm runs about five forward and four
backward. Compiled, each direction is one loop that reads its inputs once: on SmolLM2's
[1546 x 1536] SiLU-times-up 2.4 against 7.0 ms forward and backward, and its [1546 x 576] RMSNorm 0.8
against 2.5 ms (one thread, this project's Xeon). The formulas are the same; the results differ
from eager's by float rounding (the exponential and the per-token sum are computed differently).

Only training steps use them (`fused.py` passes them where gradients are on): evaluation and
decoding during training run the eager forwards, transformers' numbers bit for bit, as
`launch/eval.py` scores them. The first call in a process compiles (tens of seconds on one core, then
kept in inductor's on-disk cache, /tmp/torchinductor_<user>, for later processes); shapes are
dynamic, so packed batches of new lengths do not compile again. CPU only. `None` (auto) turns it on
for CPU training of bases at least `AUTO_MIN_HIDDEN` wide, where the time saved per step soon repays
the compile; the tests' tiny bases stay eager. Where compiling fails (no C++ compiler, an unsupported
torch build), the process says why once and runs the fused ops' own eager passes from then on.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from trainer.speedups import fused

log = logging.getLogger(__name__)

AUTO_MIN_HIDDEN = 512  # SmolLM2-135M is 576 wide; the built-in tiny base 128


def wanted(setting: bool | None, device: torch.device, hidden_size: int) -> bool:
    """train.compiled_kernels on `device`: never off the CPU (inductor's CPU loops are what was measured
    and tested); there true or false as given, null (auto) for a base at least `AUTO_MIN_HIDDEN` wide."""
    if device.type != "cpu":
        return False
    return setting if setting is not None else hidden_size >= AUTO_MIN_HIDDEN


class Kernel:
    """`function` compiled on first use (dynamic shapes). If compiling or running the compiled code
    fails where `function` itself runs, this call returns `function`'s result and `owner.failed` is
    set (the fused ops then take their own eager passes); an error `function` raises too is the
    caller's, and propagates."""

    def __init__(self, function: Callable, owner: Kernels):
        self.function = function
        self.owner = owner
        self.compiled: Callable | None = None

    def __call__(self, *args):
        try:
            if self.compiled is None:
                self.compiled = torch.compile(self.function, dynamic=True)
            return self.compiled(*args)
        except (torch.OutOfMemoryError, MemoryError):
            raise
        except Exception as error:  # noqa: BLE001  (the compiler's failure, unless eager fails as well)
            result = self.function(*args)
            self.owner.fail(self.function.__name__, error)
            return result


class Kernels:
    """The compiled loops, one set per process (`KERNELS`); pickled by name, so a model whose
    forwards hold it still pickles."""

    def __init__(self):
        self.failed = False  # once set, `usable` is False: the fused ops run eager
        # fused.py's own functions for each direction, compiled: one definition of every formula
        self.silu_mul = Kernel(fused.silu_mul, self)
        self.silu_mul_grads = Kernel(fused.silu_mul_grads, self)
        self.rms_norm = Kernel(fused.rms_norm, self)
        self.rms_norm_input_grad = Kernel(fused.rms_norm_input_grad, self)

    @property
    def usable(self) -> bool:
        return not self.failed

    def fail(self, name: str, error: Exception) -> None:
        if not self.failed:
            log.warning("train.compiled_kernels: torch.compile of %s failed (%s: %s); the fused MLP and norm "
                        "run eager from now on (the same numbers up to float rounding, slower)", name,
                        type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        self.failed = True

    def __reduce__(self):
        return _kernels, ()


KERNELS = Kernels()


def _kernels() -> Kernels:
    return KERNELS
