"""The model: a frozen quantised base with our LoRA adapters.

    base.py            the base and its tokenizer through transformers, quantised by bitsandbytes
    base_fixes.py      what load_base changes in the loaded model: 8-bit eval off a GPU, 4-bit layout, own weights
    lora.py            LoRA on linear layers: W x + (alpha/r) B A x, mergeable into W
    adapters.py        a model's adapters together: parameters, optimizer groups (LoRA+), merge all, summary
    dequantise.py      a quantised base layer's weight as floats, or the layer as a plain nn.Linear
    lora_embedding.py  LoRA on the token embedding
    dora.py            DoRA's weight norm (lora.dora)
    gguf.py            a .gguf file as a base, converted once; the built-in SmolLM2-135M
    tiny_base.py       the built-in random 4-layer Llama (`builtin:tiny-llama`)
"""
