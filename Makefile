# The README's two commands: `make demo` and `make test`. Each sets up first (idempotent).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch; installed before anything else so that no dependency pulls a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
EXTRAS ?= test,bnb,deepspeed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	@if $(BIN)/python -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	elif nvidia-smi -L >/dev/null 2>&1; then $(BIN)/python -m pip install -q torch; \
	else $(BIN)/python -m pip install -q "$(TORCH_CPU)"; fi
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	@# DeepSpeed JIT-compiles its CPU ops on first use (~1 min, cached in ~/.cache/torch_extensions): do it once
	@# here, so the 2-process ZeRO tests do not each pay for it (or race to build it) inside their timeouts.
	@if ! nvidia-smi -L >/dev/null 2>&1 && $(BIN)/python -c "import deepspeed" 2>/dev/null; then \
		DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" \
		|| echo "warning: DeepSpeed's CPU ops did not build (needs a C++ compiler); the ZeRO tests will fail"; fi
	touch $(STAMP)

# Pre-train the tiny Llama (runs/quickstart), then fine-tune that saved model on instruction data (runs/sft).
demo: setup
	$(BIN)/hf-efftrain train recipes/quickstart.yaml
	$(BIN)/hf-efftrain train recipes/sft.yaml

test: setup
	$(BIN)/python -m pytest -q -rs --durations=15

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

gpu-check: setup
	VENV=$(VENV) bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) runs
