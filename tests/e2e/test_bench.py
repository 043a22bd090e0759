"""The benchmark's GPU setup, checked without a GPU."""
from __future__ import annotations

from conftest import ROOT


def test_bench_gives_theirs_one_gpu_and_a_real_vocabulary(tmp_path, monkeypatch):
    """On a multi-GPU machine HF Trainer would use DataParallel over every GPU (batch micro x GPUs)."""
    import subprocess
    import sys

    sys.path.insert(0, str(ROOT / "launch"))
    import bench

    from launch.benchmarks import job as bench_job

    seen = {}

    def fake_run(command, cwd, env, stdout, stderr):
        seen.update(env)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5")
    bench.run_child(["-m", "launch.benchmarks.hf_trainer"], tmp_path, tuned_malloc=False)
    assert seen["CUDA_VISIBLE_DEVICES"] == "2"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    bench.run_child(["-m", "launch.benchmarks.hf_trainer"], tmp_path, tuned_malloc=False)
    assert seen["CUDA_VISIBLE_DEVICES"] == "0"
    assert bench_job.MIN_VOCAB == 32000
