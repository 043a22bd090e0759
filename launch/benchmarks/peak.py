"""The matrix-multiply peak the bench's utilisation is taken against, measured on this device
(`matmul_peak`): on CPU one thread's best fp32 rate through torch's `mm` or oneDNN, x threads
(`measured_cpu_matmul_flops`; with the frozen linears in bf16, the rate of the step's mix of
products), on GPU the dense bf16 rate (`measured_bf16_matmul_flops`).
"""
from __future__ import annotations

import time

from launch.benchmarks.job import FROZEN


# Products the size of the real base's (SmolLM2-135M: 576 wide, MLP 1536) and a large square one:
# the peak is the best rate any of them reaches.
PEAK_SHAPES = ((2048, 576, 576), (2048, 576, 1536), (2048, 2048, 2048))


def measured_cpu_matmul_flops(repeats: int = 5, dtype: str = "float32") -> dict[str, float | str]:
    """One thread's matrix-multiply rate on this CPU in `dtype`, measured now (FLOP/s): the best of
    `repeats` timed products of each of `PEAK_SHAPES`, through torch's `mm` (MKL on x86 in fp32,
    oneDNN in bf16: AMX tiles on a CPU that has them) and, in fp32 where the build has it, oneDNN
    (ours' frozen layers use whichever is faster on this CPU, trainer/speedups/onednn.py): the faster
    library sets the peak. A step on N threads is measured against N x this."""
    import torch

    from trainer.speedups import onednn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        libraries = {"torch.mm": lambda a, b: torch.mm(a, b)}
        if onednn.available() and dtype == "float32":  # the products ours routes there, through the same function
            libraries["oneDNN"] = lambda a, b: onednn.linear(a, b.t())
        best = {name: 0.0 for name in libraries}
        for rows, inner, columns in PEAK_SHAPES:
            a, b = (torch.randn(shape).to(getattr(torch, dtype)) for shape in ((rows, inner), (inner, columns)))
            for name, multiply in libraries.items():
                multiply(a, b)  # first call: packing, primitive creation
                for _ in range(repeats):
                    started = time.perf_counter()
                    multiply(a, b)
                    best[name] = max(best[name], 2 * rows * inner * columns / (time.perf_counter() - started))
    finally:
        torch.set_num_threads(threads)
    fastest = max(best, key=best.get)
    return {"per_thread": best[fastest], "library": fastest, **{f"per_thread {name}": rate for name, rate in best.items()}}


def matmul_peak(gpu: bool, threads: int, flops: dict[str, float] | None = None, frozen_dtype: str = "float32") -> dict:
    """The rate the bench's utilisation is taken against: {"flops": FLOP/s for the whole job (a CPU
    job on `threads` threads: one thread's rate x threads), "text": how it was found, ...}.

    A CPU job whose frozen linears compute in bf16 (quant.compute_dtype=bfloat16, the rest fp32) runs
    two kinds of product: its peak is the rate at which this step's FLOPs (`flops`, by part) would
    run if each kind ran at its own measured peak, = all FLOPs / (frozen / bf16 peak + the rest /
    fp32 peak). Utilisation is then the step's time at the peaks over its real time."""
    if gpu:
        rate = measured_bf16_matmul_flops()
        return {"flops": rate, "text": f"dense bf16, measured: {rate / 1e12:,.0f} TFLOP/s"}
    measured = measured_cpu_matmul_flops()
    per_thread = measured["per_thread"]
    peak = {**measured, "threads": threads, "flops": per_thread * threads,
            "text": f"fp32, one thread {per_thread / 1e9:,.0f} GFLOP/s ({measured['library']}, measured) "
                    f"x {threads} thread(s)"}
    if frozen_dtype == "float32":
        return peak
    if not flops:
        raise ValueError("a peak for frozen linears in another dtype needs the step's FLOPs by part")
    other = measured_cpu_matmul_flops(dtype=frozen_dtype)["per_thread"]
    rest = sum(flops.values()) - flops[FROZEN]
    seconds = flops[FROZEN] / (other * threads) + rest / (per_thread * threads)
    peak.update(per_thread_frozen=other, frozen_dtype=frozen_dtype, flops=sum(flops.values()) / seconds)
    peak["text"] = (f"frozen linears in {frozen_dtype}: one thread {other / 1e9:,.0f} GFLOP/s (torch.mm, measured); "
                    f"the rest fp32: one thread {per_thread / 1e9:,.0f} GFLOP/s ({measured['library']}, measured); "
                    f"this step's mix at those rates: {peak['flops'] / 1e9:,.0f} GFLOP/s for the job "
                    f"({threads} thread(s))")
    return peak


def measured_bf16_matmul_flops(size: int = 8192, repeats: int = 20) -> float:
    """The device's dense bf16 matrix-multiply rate, measured now (FLOP/s): the best of `repeats`
    timed [size x size] products, after a warm-up. MFU is taken against this, not a datasheet
    number: clocks, power limits and the card's variant (SXM, PCIe, NVL) differ from one machine to
    the next."""
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    del a, b
    torch.cuda.empty_cache()
    return 2 * size ** 3 / best
