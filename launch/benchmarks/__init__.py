"""The pieces of `launch/bench.py` and `launch/gpu_check.py` (not installed with the trainer).

    job.py         the job both frameworks run and its FLOP count
    peak.py        the matrix-multiply peak measured on this device, utilisation's denominator
    hf_trainer.py  the same job trained by transformers Trainer + peft
    probe.py       a script run as `python SCRIPT`, its peak memory recorded at exit
    profile.py     where our step's time goes, part by part
    results.py     a run's numbers from its step ends, and the table that sets ours beside theirs
    gpu_checks.py  the checks `launch/gpu_check.py` runs on one GPU, each in its own process
"""
