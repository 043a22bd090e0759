"""Merge an adapter into its base and save a plain transformers model (safetensors + tokenizer).

    python launch/export.py recipes/tiny_alpaca.yaml adapter=runs/tiny_alpaca/checkpoints/step-400 out=exported
    python launch/export.py RECIPE adapter=DIR out=DIR [export.dtype=auto|float32|bfloat16|float16]
        [export.base=dequantised|original] [section.key=value ...]
    python launch/export.py RECIPE adapter=DIR out=FILE.gguf [format=f16|q8_0|f32]   # one GGUF file (llama.cpp, ollama)
"""
import _bootstrap  # noqa: F401  (puts the repository root on sys.path)

from trainer.evaluation.export import main

if __name__ == "__main__":
    main()
