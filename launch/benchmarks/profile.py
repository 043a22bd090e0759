"""Where our training step's time goes: a few steps of the real loop under torch.profiler, each
op's time given to the part of the step it ran in.

    python -m launch.benchmarks.profile RECIPE [section.key=value ...] [--warmup 2] [--steps 3] [--out PATH]
    deepspeed --num_gpus 2 --module launch.benchmarks.profile RECIPE ...     (rank 0 reports)

The run is built by `trainer.setup.setup` and stepped by `trainer.loop.train_step`, as
`launch/train.py` does (nothing is evaluated, logged or saved). Nothing in trainer/ is changed: the
parts are marked from outside. Forward hooks on module types open a `record_function` range per
module call (the loss wrapper, the decoder, attention modules, LoRA layers, frozen linear layers,
the output layer), and note the autograd sequence numbers the call's graph nodes were given; the
backward's nodes carry the same numbers, so each backward op is given to the module whose forward
made it. q, k and v fused into one product (trainer/speedups/projections.py) are not module calls:
that op marks its frozen and adapter products with ranges of its own. An op inherits the innermost
part it ran in. Anything named `*dequantize*`
(bitsandbytes' 4-bit and blockwise dequantisation, in either pass) counts as dequantisation
wherever it runs; the collate is "data"; DeepSpeed's `engine.step` and the gradient accumulation
nodes (where ZeRO's gradient hooks run) are "optimizer"; the rest is "other".

On CPU the split is of the calling thread's time (the ops' own time, their intra-op threads
included); on a GPU it is of the kernels' time, and what is left of the step is the GPU waiting.
Prints a table; --out writes it as JSON.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn
from torch.autograd.profiler import record_function

from trainer.speedups import projections

DEQUANTISE = "dequantise 4-bit weights"
FROZEN = "frozen linears (matmuls)"
LORA = "LoRA adapters"
ATTENTION = "attention (scores, softmax, values, rotary)"
LAYERS = "rest of the layers (norms, MLP activation, residuals, embedding)"
LOSS = "loss (output layer + cross-entropy)"
OPTIMIZER = "optimizer (ZeRO gradient hooks, clipping, AdamW)"
DATA = "data (collate)"
OTHER = "other (the step's Python, DeepSpeed's glue)"
PARTS = (DEQUANTISE, FROZEN, LORA, ATTENTION, LAYERS, LOSS, OPTIMIZER, DATA, OTHER)
PREFIX = "bench::"  # the record_function ranges this module opens
BACKWARD_NODE = "autograd::engine::evaluate_function"  # the profiler's range around each backward graph node
STEP = PREFIX + "step"
QUANTISED_LINEARS = ("Linear4bit", "Linear8bitLt")
# The ranges trainer/speedups/projections.py opens inside its fused products.
RANGES = {projections.FROZEN_RANGE: FROZEN, projections.ADAPTER_RANGE: LORA}


def part_of(module: nn.Module, loss_model: nn.Module, decoder: nn.Module, head: nn.Module | None) -> str | None:
    """The part of the step a module's forward (and the backward of what it computes) belongs to."""
    if module is loss_model or module is head:
        return LOSS
    if module is decoder:
        return LAYERS
    name = type(module).__name__
    if name == "LoRALinear":
        return LORA
    if name in QUANTISED_LINEARS or (type(module) is nn.Linear and not module.weight.requires_grad):
        return FROZEN
    if name.endswith("Attention"):
        return ATTENTION
    return None


class Parts:
    """Marks each module call with a record_function range, and remembers which autograd sequence
    numbers each call's forward handed out (per call: (first, last, part)), while `recording`."""

    def __init__(self, loss_model: nn.Module, model: nn.Module):
        self.recording = False
        self.calls: list[tuple[int, int, str]] = []
        self._open: list[tuple[record_function, int, str]] = []
        # A leaf whose view makes one graph node: reading its number reads the counter's position.
        self._counter = torch.zeros((), requires_grad=True)
        head = model.get_output_embeddings()
        # Layers that run as one product (trainer/speedups/projections.py) are not called as modules,
        # and would not be if hooked: that op marks its own frozen and adapter ranges (`RANGES`).
        fused = projections.fused_layers(loss_model)
        for module in loss_model.modules():
            part = part_of(module, loss_model, model.get_decoder(), head)
            if part is not None and module not in fused:
                module.register_forward_pre_hook(self._enter(part))
                module.register_forward_hook(self._exit, always_call=True)

    def _sequence_number(self) -> int:
        if not torch.is_grad_enabled():
            return -1
        return self._counter.view(()).grad_fn._sequence_nr()

    def _enter(self, part: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if self.recording:
                marker = record_function(PREFIX + part)
                marker.__enter__()
                self._open.append((marker, self._sequence_number(), part))
        return hook

    def _exit(self, module: nn.Module, args: tuple, output: object) -> None:
        if self.recording and self._open:
            marker, first, part = self._open.pop()
            marker.__exit__(None, None, None)
            if first >= 0:
                self.calls.append((first, self._sequence_number(), part))

    def by_sequence_number(self) -> dict[int, str]:
        """Sequence number -> the innermost part whose forward made that graph node."""
        owner: dict[int, str] = {}
        # Calls nest: painting outer calls first lets the inner ones overwrite their own numbers.
        for first, last, part in sorted(self.calls, key=lambda call: (call[0], -call[1])):
            for number in range(first + 1, last):
                owner[number] = part
        return owner


def labelled(part: str, function: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        with record_function(PREFIX + part):
            return function(*args, **kwargs)
    return wrapper


def split(events, owner: dict[int, str], device_time: bool = False) -> dict[str, float]:
    """Seconds per part, summed over the `bench::step` ranges in `events` (a profiler's event list):
    every op's own time goes to the innermost part it ran in."""
    totals: dict[str, float] = defaultdict(float)

    def visit(event, inherited: str) -> None:
        part = inherited
        if inherited == DEQUANTISE or "dequantize" in event.name:
            part = DEQUANTISE
        elif event.name == STEP:
            part = OTHER
        elif event.name.startswith(PREFIX):
            part = event.name.removeprefix(PREFIX)
        elif event.name in RANGES:
            part = RANGES[event.name]
        elif event.name.startswith(BACKWARD_NODE):
            part = OPTIMIZER if "AccumulateGrad" in event.name else owner.get(event.sequence_nr, OTHER)
        own = event.self_device_time_total if device_time else event.self_cpu_time_total
        totals[part] += own / 1e6
        for child in event.cpu_children:
            visit(child, part)

    steps = [event for event in events if event.name == STEP and event.cpu_parent is None]
    for event in steps:
        visit(event, OTHER)
    # With CUDA tensors autograd runs the backward's nodes on a thread of its own per device, outside
    # the step's range: those that ran within a step's span are the step's too.
    threads = {event.thread for event in steps}
    spans = [(event.time_range.start, event.time_range.end) for event in steps]
    for event in events:
        if (event.cpu_parent is None and event.thread not in threads and event.name.startswith(BACKWARD_NODE)
                and any(start <= event.time_range.start and event.time_range.end <= end for start, end in spans)):
            visit(event, OTHER)
    return dict(totals)


def profile(recipe, warmup: int, steps: int) -> dict:
    from trainer import loop
    from trainer.runtime import distributed
    from trainer.setup import setup

    run, _ = setup(recipe, dry_run=False)
    run.engine.train()
    parts = Parts(run.loss_model, run.model)
    run.collate = labelled(DATA, run.collate)
    run.engine.step = labelled(OPTIMIZER, run.engine.step)
    # Without ZeRO the loop takes the gradients' norm itself (DeepSpeed keeps none): clipping's work.
    norm = loop.adapter_gradient_norm
    loop.adapter_gradient_norm = labelled(OPTIMIZER, norm)
    gpu = run.device.type == "cuda"
    step = 0

    def one_step() -> float:
        nonlocal step
        started = time.perf_counter()
        loop.train_step(run, step, loop.learning_rate(step, recipe.train), lambda: False,
                        run.data.trained_tokens(step))
        if gpu:
            torch.cuda.synchronize()
        step += 1
        return time.perf_counter() - started

    for _ in range(warmup):
        one_step()
    plain = [one_step() for _ in range(steps)]
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
    parts.recording = True
    profiled = []
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(steps):
            with record_function(STEP):
                profiled.append(one_step())
    parts.recording = False
    loop.adapter_gradient_norm = norm
    seconds = {part: value / steps for part, value in split(profiler.events(), parts.by_sequence_number(), gpu).items()}
    if gpu:  # kernels' time; the rest of the wall clock the GPU spent waiting
        seconds["GPU idle (waiting on the host)"] = max(statistics.mean(profiled) - sum(seconds.values()), 0.0)
    return {"seconds_per_step": seconds, "step_time_profiled_s": statistics.mean(profiled),
            "step_time_unprofiled_s": statistics.median(plain), "steps": steps, "warmup": warmup,
            "world_size": distributed.world_size(), "device": "cuda" if gpu else "cpu",
            "threads": torch.get_num_threads()}


def table(result: dict) -> str:
    """The split as a markdown table, largest part first."""
    seconds = result["seconds_per_step"]
    total = sum(seconds.values())
    what = "kernel time" if result["device"] == "cuda" else "time"
    lines = [f"| part of our step ({what}) | s per step | share |", "| --- | ---: | ---: |"]
    for part in sorted(seconds, key=seconds.get, reverse=True):
        lines.append(f"| {part} | {seconds[part]:.3f} | {seconds[part] / total:.1%} |")
    lines.append(f"| **step under the profiler** | **{total:.3f}** | 100% |")
    lines += ["", f"Mean of {result['steps']} profiled steps ({result['step_time_profiled_s']:.3f} s of wall clock) "
                  f"after {result['warmup'] + result['steps']} unprofiled ones (median {result['step_time_unprofiled_s']:.3f} "
                  f"s); {result['world_size']} rank(s), {result['threads']} torch thread(s) each."]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from trainer.cli import run_script
    from trainer.recipe_loading import load_recipe
    from trainer.runtime import distributed

    argv = [a for a in argv if not a.startswith("--local_rank")]  # deepspeed's launcher adds it
    options = {"--warmup": "2", "--steps": "3", "--out": ""}
    for flag in options:
        if flag in argv:
            index = argv.index(flag)
            options[flag] = argv[index + 1]
            del argv[index:index + 2]

    def body() -> None:
        result = profile(load_recipe(argv[0], argv[1:]), int(options["--warmup"]), int(options["--steps"]))
        if distributed.is_main():
            print("\n" + table(result), flush=True)
            if options["--out"]:
                with open(options["--out"], "w") as handle:
                    json.dump(result, handle, indent=2)

    run_script(body, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
