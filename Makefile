# ari-push: `make test` (everything CI runs), `make run` (sandbox + daemon), `make lint`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: all venv sandbox test unit lint types run clean bench

all: test

$(BIN)/ari-push: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

venv: $(BIN)/ari-push

# Debian packages (redis, SIPp, debootstrap) and the cached Asterisk 22 root (needs root).
sandbox:
	$(PY) -m rig provision

lint: venv
	$(BIN)/ruff check ari_push tests rig

types: venv
	$(BIN)/mypy ari_push

unit: venv
	$(BIN)/pytest -q tests/unit

# The whole suite: lint, types, unit and integration tests on the real rig.
test: venv sandbox lint types
	$(BIN)/pytest -q

# The sandbox Asterisk + Redis and the daemon in the foreground (Ctrl-C stops all).
run: venv sandbox
	$(BIN)/python -m rig run

bench: venv sandbox
	$(BIN)/python bench/push_concurrency.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
