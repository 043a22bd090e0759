"""launch/train.py with a fault injected, for the tests that need one (the trainer has no test hooks):

    python tests/faults.py RECIPE [section.key=value ...]

    QLORA_TEST_NAN_AT_STEP=k       optimizer step k's (1-based) loss is NaN
    QLORA_TEST_NAN_GRAD_AT_STEP=k  step k's loss stays finite and its gradients are NaN
    QLORA_TEST_SLOW_SAVE=s         each checkpoint waits s seconds after writing its adapter file,
                                   so a test can kill the process while a checkpoint is half written
"""
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import cli, loop  # noqa: E402
from trainer.checkpoint import saving  # noqa: E402
from trainer.loss import CausalLMLoss  # noqa: E402

NAN_AT = os.environ.get("QLORA_TEST_NAN_AT_STEP")
NAN_GRAD_AT = os.environ.get("QLORA_TEST_NAN_GRAD_AT_STEP")
SLOW_SAVE = float(os.environ.get("QLORA_TEST_SLOW_SAVE", "0"))
current_step = [0]  # 1-based step being trained


def counting_train_step(run, step, *args, **kwargs):
    current_step[0] = step + 1
    return original_train_step(run, step, *args, **kwargs)


def poisoned_forward(self, *args, **kwargs):
    output = original_forward(self, *args, **kwargs)
    # Training forwards only: with labels, under autograd (evaluation runs without gradients).
    if kwargs.get("labels") is None or not torch.is_grad_enabled():
        return output
    loss_sum, count = output
    if NAN_AT == str(current_step[0]):
        loss_sum = loss_sum * float("nan")
    if NAN_GRAD_AT == str(current_step[0]) and loss_sum.requires_grad:
        loss_sum.register_hook(lambda grad: grad * float("nan"))
    return loss_sum, count


def slow_save_file(tensors, filename, *args, **kwargs):
    original_save_file(tensors, filename, *args, **kwargs)
    if Path(filename).name == "adapter_model.safetensors":
        time.sleep(SLOW_SAVE)


if __name__ == "__main__":
    original_train_step, loop.train_step = loop.train_step, counting_train_step
    original_forward, CausalLMLoss.forward = CausalLMLoss.forward, poisoned_forward
    original_save_file, saving.save_file = saving.save_file, slow_save_file
    cli.main(loop.train)
