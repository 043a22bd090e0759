"""The CUDA path checked in one go on one GPU (issue 20), in at most ~10 minutes; prints one table.

    make gpu-check                                   # = python3 launch/gpu_check.py
    .venv/bin/python launch/gpu_check.py --prepare-wheels [--cuda 130]   # where pip works, before

Without CUDA it says so and exits 0. The GPU machine needs torch (with CUDA), transformers, peft
and accelerate; deepspeed and bitsandbytes (and what they need that such a machine lacks) come as
wheels carried beside the checkout in `.whl/` (or $QLORA_GPU_WHEELS), installed into
/tmp/qlora-gpu-site. `--prepare-wheels`, run where pip and this project's .venv work, writes them:
the versions this checkout is tested with, DeepSpeed built as a pure-Python wheel, and
bitsandbytes cut down to its Python files plus the one CUDA library matching the GPU machine's
torch (`--cuda 130` for CUDA 13.0; the full wheel, every CUDA version, is over 100 MB).

The checks, each in its own process, are in launch/benchmarks/gpu_checks.py (training on the tiny
and a real base, ZeRO-3 and resume, decoding, packed attention, 8-bit, fp16, export, CPU-GPU
synchronisations, `launch/bench.py`). Exits 1 if a check fails. Files go to runs/gpu_check/
(table.md, each check's log).
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (puts the repository root on sys.path)

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from launch.benchmarks.gpu_checks import CHECKS, OUT, ROOT

WHEELS = Path(os.environ.get("QLORA_GPU_WHEELS", ROOT / ".whl"))
SITE = Path("/tmp/qlora-gpu-site")
BUDGET_S = 570  # the whole check, wheel installation included, stays under 10 minutes
# Carried alongside deepspeed and bitsandbytes: what they (and the versions of transformers this
# checkout is tested with) need that the GPU image lacks or has at another version.
# transformers 5.25 needs huggingface-hub 2.x, which needs httpx2 (the image has hub 1.x and httpx).
CARRIED = ["hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "gguf",
           "transformers", "huggingface-hub", "tokenizers", "peft", "accelerate", "kernels", "tomlkit",
           "httpx2", "httpcore2", "truststore", "hf-xet", "click",
           "pytest", "pluggy", "iniconfig", "pygments"]  # pytest: the CUDA tests of tests/speedups


def main(argv: list[str]) -> int:
    if "--prepare-wheels" in argv:
        cuda = argv[argv.index("--cuda") + 1] if "--cuda" in argv else "130"
        prepare_wheels(cuda)
        return 0
    if not cuda_available():
        print("gpu-check needs CUDA: there is no CUDA device here (or no torch with CUDA); nothing was run.")
        return 0
    started = time.monotonic()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    env = child_environment()
    rows: list[tuple[str, str, str, float]] = []
    for name, check in CHECKS:
        left = BUDGET_S - (time.monotonic() - started)
        if left < 20:
            rows.append((name, "SKIP", "out of time", 0.0))
            continue
        began = time.monotonic()
        try:
            result, details = check(env, left)
        except subprocess.TimeoutExpired:
            result, details = "FAIL", f"timed out after {left:.0f} s"
        except Exception as error:  # one check's failure must not hide the others' results
            result, details = "FAIL", f"{type(error).__name__}: {error}"[:300]
        rows.append((name, result, details, time.monotonic() - began))
        print(f"[gpu-check] {name}: {result} ({details})", flush=True)
    table = format_table(rows, env)
    print("\n" + table)
    (OUT / "table.md").write_text(table + "\n")
    return 1 if any(result == "FAIL" for _, result, _, _ in rows) else 0


# ---------------------------------------------------------------------------------- set-up


def cuda_available() -> bool:
    """Asked in a child process: this one imports no torch and holds no GPU memory."""
    probe = "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"
    try:
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def child_environment() -> dict[str, str]:
    """The environment every check runs in: the carried wheels first on the path, when needed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "QLORA_TRAINER_CACHE": str(OUT / "cache"), "DS_BUILD_OPS": "0"}
    env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]  # one GPU
    wheels = sorted(WHEELS.glob("*.whl"))
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, wheels)], check=True)
        env["PYTHONPATH"] = os.pathsep.join([str(SITE), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    else:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    missing = subprocess.run([sys.executable, "-c", "import deepspeed, bitsandbytes"], env=env,
                             capture_output=True, text=True)
    if missing.returncode != 0:
        raise SystemExit(f"gpu-check: deepspeed or bitsandbytes cannot be imported and no wheels in {WHEELS} "
                         f"provide them; run `.venv/bin/python launch/gpu_check.py --prepare-wheels` where pip "
                         f"works and carry {WHEELS.name}/.\n{missing.stderr[-1500:]}")
    return env


def prepare_wheels(cuda: str) -> None:
    """Write the wheels a GPU machine without deepspeed and bitsandbytes needs into WHEELS."""
    from importlib.metadata import version

    WHEELS.mkdir(parents=True, exist_ok=True)
    exclude = ROOT / ".git" / "info" / "exclude"
    if exclude.parent.is_dir() and "/.whl/" not in (exclude.read_text() if exclude.exists() else ""):
        with open(exclude, "a") as handle:  # the wheels travel with the checkout, but are never committed
            handle.write("/.whl/\n")
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 34)] + ["--platform=manylinux2014_x86_64"]
    pinned = [f"{name}=={version(name)}" for name in ["bitsandbytes", *CARRIED]]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "cp", *platforms, "-d", str(WHEELS), *pinned], check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(WHEELS),
                    f"deepspeed=={version('deepspeed')}"], check=True, env={**os.environ, "DS_BUILD_OPS": "0"})
    for wheel in WHEELS.glob("bitsandbytes-*.whl"):
        slim_bitsandbytes(wheel, cuda)
    total = sum(w.stat().st_size for w in WHEELS.glob("*.whl"))
    print(f"wrote {len(list(WHEELS.glob('*.whl')))} wheels to {WHEELS} ({total / 2**20:.1f} MiB)")


def slim_bitsandbytes(wheel: Path, cuda: str) -> None:
    """Keep bitsandbytes' Python files, its CPU library and the CUDA library for `cuda` only."""
    keep = f"libbitsandbytes_cuda{cuda}.so"
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
        names = source.namelist()
        if not any(name.endswith(keep) for name in names):
            raise SystemExit(f"{wheel.name} has no {keep}; pick --cuda from "
                             f"{sorted(n.rsplit('_cuda', 1)[1][:-3] for n in names if '_cuda' in n)}")
        for name in names:
            dropped = name.endswith(".so") and "libbitsandbytes_" in name and not name.endswith(
                (keep, "libbitsandbytes_cpu.so"))
            if dropped:
                continue
            data = source.read(name)
            if name.endswith(".dist-info/RECORD"):  # the dropped libraries leave the record too
                data = b"\n".join(line for line in data.splitlines()
                                  if not (b"libbitsandbytes_" in line and b".so," in line
                                          and keep.encode() not in line and b"_cpu.so" not in line)) + b"\n"
            target.writestr(name, data)
    slim.replace(wheel)


# ---------------------------------------------------------------------------------- the table


def format_table(rows: list[tuple[str, str, str, float]], env: dict) -> str:
    versions = subprocess.run(
        [sys.executable, "-c", "import torch, transformers, deepspeed, bitsandbytes; "
         "print(torch.cuda.get_device_name(0), '| torch', torch.__version__, '| transformers', "
         "transformers.__version__, '| deepspeed', deepspeed.__version__, '| bitsandbytes', bitsandbytes.__version__)"],
        cwd=ROOT, env=env, capture_output=True, text=True).stdout.strip()
    lines = [f"gpu-check, {time.strftime('%Y-%m-%d')}: {versions}", "",
             "| check | result | details | s |", "| --- | --- | --- | ---: |"]
    lines += [f"| {name} | {result} | {details} | {seconds:.0f} |" for name, result, details, seconds in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
