# moltbot: `make run` serves the demo models; `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN_DIR := $(CURDIR)/run
SOCKET := $(RUN_DIR)/moltbotd.sock
PYTEST_ARGS ?=

.PHONY: venv run demo check lint unit test bench clean

venv: $(VENV)/.installed
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: venv
	$(PY) -m moltbotd.demo $(RUN_DIR)/models

# Serve the demo repository in the foreground; in another terminal:
#   export MOLTBOT_SOCKET=$(SOCKET); .venv/bin/moltctl status
run: demo
	$(VENV)/bin/moltbotd --socket $(SOCKET) --models-dir $(RUN_DIR)/models

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The quick loop: lint, then unit and integration tests (no VM).
check: lint
	$(VENV)/bin/pytest -q -m 'not vm' $(PYTEST_ARGS)

# Everything.
test: lint
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

bench: venv
	$(PY) bench/bench.py

clean:
	rm -rf $(VENV) $(RUN_DIR) build dist *.egg-info .pytest_cache .ruff_cache
