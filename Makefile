# pyshim — developer entry points.
#   make test   install system deps if missing, build the venv, run unit + e2e tests
#   make demo   same preparation, then run demo/demo.py against a private containerd
#   make lint   ruff check, ruff format --check, mypy
#   make proto  regenerate shimv2/api from proto/
#   make bench  run bench/suite.py (pyshim vs the Go shim: latency, memory, scale)
#   make test-node  the `node` tests on a systemd + cgroup v2 VM (../shared/vm; ARGS=pytest args)

SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: help deps venv test test-node lint demo proto bench clean

help:
	@sed -n '2,8p' Makefile

deps:
	scripts/install-deps.sh

venv: $(STAMP)

# re-installs when the project metadata or build hook changes. pip puts the
# launcher pair setup.py built in $(VENV)/bin (containerd-shim-pyshim-v2, which
# the e2e harness and the demo put first on containerd's PATH: the native
# launcher, and the Python one next to it, .py); shimv2.launcher rewrites it
# with this venv's exact paths. The tests and the private containerd of
# shimv2.tools rebuild it when the sources changed since.
$(STAMP): pyproject.toml setup.py shimv2/launcher.c
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -I -m shimv2.launcher $(VENV)/bin/containerd-shim-pyshim-v2
	@touch $@

test: deps venv
	$(VENV)/bin/pytest -q tests

# runs entirely in the VM (it builds its own venv there); nothing here but the copy
test-node:
	scripts/test-node.sh $(ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy shimv2

demo: deps venv
	$(PY) demo/demo.py

proto: venv
	$(PY) -m tools.genproto

bench: deps venv
	$(PY) bench/suite.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache
