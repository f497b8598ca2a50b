# moltbot: `make run` serves the demo models; `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN_DIR ?= $(CURDIR)/run
SOCKET := $(RUN_DIR)/moltbotd.sock
PYTEST_ARGS ?=

.PHONY: venv run demo check lint test e2e e2e-deps bench bench-switch clean proto

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
	$(VENV)/bin/moltbotd --config etc/demo.yaml --socket $(SOCKET) --models-dir $(RUN_DIR)/models \
	  --state-dir $(RUN_DIR)/state

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

# The quick loop: lint, then unit and integration tests (no VM, no fuzz or soak).
check: lint
	$(VENV)/bin/pytest -q -m 'not vm and not stress' $(PYTEST_ARGS)

# Everything, the VM scenarios (tests/e2e) included.
test: lint e2e-deps
	$(VENV)/bin/pytest -q -rs $(PYTEST_ARGS)

# Only the VM scenarios: the .deb installed in a Debian VM with systemd and cgroup v2.
e2e: venv e2e-deps
	$(VENV)/bin/pytest -q -rs -m vm $(PYTEST_ARGS)

# What the VM scenarios and `make deb` need from Debian (installed when missing, as root).
E2E_TOOLS := qemu-system-x86_64:qemu-system-x86 mmdebstrap:mmdebstrap mkfs.ext4:e2fsprogs \
	dpkg-scanpackages:dpkg-dev lintian:lintian help2man:help2man
e2e-deps:
	@missing=$$(for t in $(E2E_TOOLS); do command -v $${t%%:*} >/dev/null || echo $${t#*:}; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The gRPC messages of the Open Inference Protocol, from moltbotd/network/oip.proto
# (tests/test_oip.py fails when the committed module is stale).
proto: venv
	cd moltbotd/network && ../../$(PY) -m grpc_tools.protoc -I. --python_out=. oip.proto

bench: venv
	$(PY) bench/bench.py
	$(PY) bench/oip.py
	$(PY) bench/chat.py

# Memory, fds and threads of the daemon across 200 version switches (docs/performance.md).
bench-switch: venv
	$(PY) bench/switch_memory.py

# Issue 14's instruments (stress/), each against a daemon of its own on a temporary
# socket: malformed frames (SEED picks them; a finding replays with
# `$(PY) -m stress.fuzz --seed S --case I`), and pipelined load under chaos.
# Short forms run in `make test` (tests/test_fuzz.py, tests/test_soak.py; -m stress).
N ?= 100000
MINUTES ?= 10
SEED ?= 0
.PHONY: fuzz soak
fuzz: venv
	$(PY) -m stress.fuzz --frames $(N) --seed $(SEED)

soak: venv
	$(PY) -m stress.soak --minutes $(MINUTES) --seed $(SEED)

clean:
	rm -rf $(VENV) $(RUN_DIR) build dist *.egg-info .pytest_cache .ruff_cache

# The Debian 12 (bookworm, amd64) package: dist/moltbot_<version>_amd64.deb and a flat
# apt repository dist/apt/ (docs/packaging.md). deb-lint runs lintian on it; `make e2e`
# installs and drives it in the test VM.
.PHONY: deb deb-lint
deb:
	packaging/deb/build

deb-lint:
	lintian --pedantic --display-info dist/moltbot_*_amd64.deb
