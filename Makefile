# ari-push: `make demo` (see it work), `make test` (everything CI runs), `make run` (sandbox + daemon),
# `make lint`, `make bench` (the end-to-end benchmark, not part of the tests).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: all venv sandbox test test-under-load unit lint types run demo clean bench bench-push bench-deps bench-fanout bench-freeswitch

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
	$(BIN)/ruff check ari_push tests rig bench examples

types: venv
	$(BIN)/mypy ari_push

unit: venv
	$(BIN)/pytest -q tests/unit

# The whole suite: lint, types, unit and integration tests on the real rig.
test: venv sandbox lint types
	$(BIN)/pytest -q

# `make test` RUNS times in a row (default 3) while stress-ng keeps one core busy: the suite must
# pass on a loaded 2-core machine. Stops at the first failing run; stress-ng is stopped in all cases.
RUNS ?= 3
test-under-load: venv sandbox
	@command -v stress-ng >/dev/null || { echo "stress-ng is missing (make sandbox installs it)"; exit 1; }
	@stress-ng --cpu 1 --quiet & load=$$!; \
	trap 'kill $$load 2>/dev/null; wait $$load 2>/dev/null' EXIT INT TERM; \
	for i in $$(seq 1 $(RUNS)); do \
	  start=$$(date +%s); \
	  echo "[test-under-load] run $$i of $(RUNS), stress-ng --cpu 1 running (pid $$load)"; \
	  if ! $(MAKE) --no-print-directory test; then \
	    echo "[test-under-load] run $$i FAILED after $$(( $$(date +%s) - start )) s"; exit 1; fi; \
	  echo "[test-under-load] run $$i passed in $$(( $$(date +%s) - start )) s"; \
	done

# The sandbox Asterisk + Redis and the daemon in the foreground (Ctrl-C stops all).
run: venv sandbox
	$(BIN)/python -m rig run

# A sleeping phone woken by a push, rung and bridged; then the Wait(3) recipe (WAKE=4: it fails).
# PBX=freeswitch: the same on FreeSWITCH, against its `sleep 2000` then bridge recipe.
demo: venv sandbox
	$(BIN)/python -m rig demo $(if $(WAKE),--wake $(WAKE)) $(if $(PBX),--pbx $(PBX))

bench-deps: venv
	@$(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/pip install -q -e '.[dev,bench]'

# Real Asterisk + Redis + daemon + local FCM: latency, time to answer, capacity, ingest (docs/performance.md).
bench: venv sandbox bench-deps
	$(BIN)/python bench/e2e.py $(BENCH_ARGS)

# PushDispatcher alone against the fake FCM/APNs (no Asterisk).
bench-push: venv
	$(BIN)/python bench/push_concurrency.py

# One AOR flooded with 10k fresh push URLs, then calls: lag and pushes sent (docs/security.md, section 7).
bench-fanout: venv sandbox
	$(BIN)/python bench/fanout.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# FreeSWITCH: re-REGISTER -> INVITE and time to answer vs the sleep-2000 recipe (docs/freeswitch.md).
bench-freeswitch: venv sandbox
	$(BIN)/python bench/freeswitch_e2e.py $(BENCH_ARGS)
