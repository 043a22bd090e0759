"""Chat with a trained adapter, a merged export or a GGUF file: streamed answers, multi-turn
history, /reset and /exit (Ctrl-C stops an answer; at the prompt it leaves); --prompt answers once and exits.

    python launch/chat.py recipes/smollm2_tasks.yaml adapter=runs/smollm2_tasks/checkpoints/best
    python launch/chat.py RECIPE adapter=DIR|merged-dir|file.gguf|none [chat.temperature=0.7] [chat.top_p=0.9]
        [chat.max_new_tokens=256] [chat.greedy=true] [chat.seed=0] [--prompt "..."] [section.key=value ...]
"""
import _bootstrap  # noqa: F401  (puts the repository root on sys.path)

from trainer.evaluation.chat import main

if __name__ == "__main__":
    main()
