"""What keeps a run going and tells the user about it.

    distributed.py       process groups, ranks, collectives, cores per rank
    deepspeed_config.py  the DeepSpeed config derived from a recipe; DeepSpeed's refusal of it as one line
    signals.py           SIGTERM / SIGINT: save at the next step and exit cleanly
    health.py            non-finite losses, out of memory: a clear message and a resumable state
    preflight.py         the summary printed before step 1
    metrics_log.py       metrics.jsonl
    report.py            report.png and TensorBoard events
    dashboards.py        TensorBoard and Weights & Biases during training
    run_dir.py           one run per output_dir: an earlier run set aside on a fresh start or a resume from
                         elsewhere; redone steps out of the logs, later checkpoints set aside on a resume
                         from an older one
    quiet.py             the libraries' routine log lines kept out of the output
    cache.py             the cache directory, and building into it once across processes
"""
