# Everything installs into .venv from pyproject.toml; targets re-install only when it changes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: setup demo test lint clean vllm llamacpp

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

demo: setup  ## build the demo model on first use and run the release pipeline on CPU
	$(BIN)/npuflow run configs/tiny-llama-cpu.yaml

test: setup lint  ## unit + integration tests (real Prefect, MLflow, S3 over HTTP)
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check npuflow tasks flows tests

vllm:  ## the vLLM (CPU) environment in .venv-vllm, from infra/vllm/requirements.txt (a serving engine)
	bash infra/vllm/install.sh .venv-vllm

llamacpp:  ## llama.cpp (llama-cpp-python built from source, native CPU) + gguf in .venv-llamacpp, for benchmarks/cpu_runtime.py; ~5 min
	bash infra/llamacpp/install.sh .venv-llamacpp

clean:
	rm -rf .npuflow .pytest_cache .ruff_cache
