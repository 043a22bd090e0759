"""After (and during) training: scoring, generating, exporting, chatting.

    held_out_loss.py  token-weighted held-out loss and perplexity
    generate.py       batched greedy decoding with a KV cache
    scores.py         exact match, final number, token F1 of generated answers
    eval_command.py   `launch/eval.py`: answer held-out instructions and score them
    adapted_model.py  a trained adapter back on its base, for evaluating, exporting and chatting
    export.py         `launch/export.py`: the adapter merged into a plain transformers model
    gguf_export.py    a merged model as one GGUF file
    gguf_mapping.py   llama.cpp's names for its tensors, q/k row order, the tokenizer keys
    chat.py           `launch/chat.py`: talk to an adapter in the terminal
    chat_session.py   one conversation: the history as training wrote it, answers sampled and streamed
"""
