"""Train a LoRA adapter on a quantised base.

    deepspeed --num_gpus 2 launch/train.py recipes/llama_alpaca.yaml [section.key=value ...]
    python launch/train.py recipes/tiny_alpaca.yaml train.max_steps=20
"""
import _bootstrap  # noqa: F401  (puts the repository root on sys.path)

from trainer.speedups import malloc

malloc.apply(__file__)  # before torch is imported: with no GPU visible, re-executes once with glibc malloc settings

from trainer.cli import main  # noqa: E402
from trainer.loop import train  # noqa: E402

if __name__ == "__main__":
    main(train)
