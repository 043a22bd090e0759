"""What `load_base` (trainer/model/base.py) changes in the model transformers returns, each where a
library's own behaviour would hurt: bitsandbytes' 8-bit layers computing off a GPU as in training, in
eval mode too; its 4-bit layers kept in their layout; its log line on every 8-bit product dropped; and
CPU weights copied out of the checkpoint file's memory mapping."""
from __future__ import annotations

import itertools

import torch
from torch import nn


def exact_int8_off_gpu(model: nn.Module, device: torch.device) -> int:
    """Run bitsandbytes' 8-bit layers on CPU (and XPU) as training runs them, in eval mode too. There
    they compute two different functions: in training mode the weight decoded and one float product
    (MatMul8bitFp), in eval mode LLM.int8's (inputs cast to fp16, rounded to int8 per row, outlier
    columns picked over the whole batch), whose results depend on which rows share a batch: on
    SmolLM2 the held-out loss of one adapter moved by up to 10% with the micro-batch size, and eval,
    sampling and chat scored another model than the one trained and exported (export merges the
    decoded weight). The layers hold no dropout, so training mode changes nothing else. On a GPU both
    modes run LLM.int8. Returns how many layers were set."""
    if device.type not in ("cpu", "xpu"):
        return 0
    layers = [module for module in model.modules() if type(module).__name__ == "Linear8bitLt"]
    for layer in layers:
        layer.register_forward_pre_hook(_in_training_mode)
    return len(layers)


def _in_training_mode(layer: nn.Module, args: tuple) -> None:
    layer.training = True  # read by Linear8bitLt.forward: state.is_training picks the float product


def quiet_int8_cast_warning() -> None:
    """bitsandbytes logs "MatMul8bitLt: inputs will be cast from ... to float16" on every 8-bit matrix
    multiply whose input is not fp16: on a GPU in bf16, every LLM.int8 layer of every forward
    (hundreds of lines per micro-batch per rank). The cast is how LLM.int8 works (its int8 kernels
    quantise fp16 inputs), not something to act on; the recipe says what 8-bit costs. Only that
    message is dropped (trainer/runtime/quiet.py's filter, applied here even with --debug)."""
    import logging

    from trainer.runtime.quiet import DropNoise

    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, DropNoise) for f in logger.filters):
        logger.addFilter(DropNoise(("MatMul8bitLt: inputs will be cast",)))


def own_weights(model: nn.Module) -> int:
    """Copy into the process's own memory the CPU weights that are still views of the checkpoint file.

    safetensors maps the file, and transformers keeps the tensors it does not convert (the embedding,
    the norms: what is not quantised) as views of that mapping. The mapping then lives as long as the
    model, and with it every page of the file read during loading: on SmolLM2, 419 MB of resident
    file pages (the whole 513 MB file was read to quantise the linears) for a 113 MB embedding. The
    quantised weights (integer storage) are the process's own already. Returns the bytes copied."""
    copied = 0
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.device.type == "cpu" and tensor.is_floating_point():
            tensor.data = tensor.data.clone()
            copied += tensor.numel() * tensor.element_size()
    return copied


def keep_4bit_layout(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU AVX512-BF16 kernel.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a `Linear4bit`'s weight in place the first
    time the layer runs in eval mode without gradients (an evaluation during training, a sample
    generation). From then on the layer computes in bf16, passes no gradient to its input (training
    would go on with the base's path cut at every layer), and `dequantize_4bit` misreads the new
    layout (merging, export). Returns how many layers were changed."""
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed
