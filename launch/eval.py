"""Evaluate an adapter by generation on held-out instructions: exact match, token F1, ROUGE-L,
final-number accuracy, held-out loss; writes predictions.jsonl and metrics.json.

    python launch/eval.py recipes/tiny_alpaca.yaml adapter=runs/tiny_alpaca/checkpoints/step-400
    deepspeed --num_gpus 2 launch/eval.py recipes/tiny_alpaca.yaml adapter=DIR deepspeed.zero_stage=3
    python launch/eval.py RECIPE adapter=DIR|none [eval.file=rows.jsonl] [eval.max_new_tokens=64]
        [eval.batch_size=16] [eval.max_rows=N] [out=DIR] [section.key=value ...]
"""
import _bootstrap  # noqa: F401  (puts the repository root on sys.path)

from trainer.evaluation.eval_command import main

if __name__ == "__main__":
    main()
