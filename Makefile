# The README's two commands: `make quickstart` and `make test`.
# Each creates .venv with exactly the locked set (requirements/lock.txt, hashes checked) if missing,
# or brings it back to the lock when the lock changed.

VENV ?= .venv
BIN := $(VENV)/bin
LOCK := requirements/lock.txt

# The Python the lock was compiled with first (3.11), then any other that setup.cfg's
# python_requires (>= 3.11) takes; `make PYTHON=/path/to/python3.11` picks one.
PY_OK := import sys; sys.exit(sys.version_info < (3, 11))
PYTHON ?= $(shell for p in python3.11 python3 python3.12 python3.13; do \
  $$p -c '$(PY_OK)' >/dev/null 2>&1 && { echo $$p; break; }; done)
CHECK_PYTHON = @$(PYTHON) -c '$(PY_OK)' >/dev/null 2>&1 || { echo "make: lmstack needs Python >= 3.11 \
  (found $(or $(PYTHON),none)): install python3.11, or run make PYTHON=/path/to/python3.11" >&2; exit 2; }

.PHONY: quickstart test lint test-latest lock bench venv clean
SHELL := /bin/bash

venv: $(VENV)/.installed

# The lock first (pip, setuptools and pip-tools included), then pip-sync removes what the lock no
# longer holds, then lmstack itself, its dependencies already in place and built with the locked
# setuptools (no build isolation: nothing unlocked is fetched).
$(VENV)/.installed: $(LOCK) setup.cfg pyproject.toml
	$(CHECK_PYTHON)
	$(BIN)/python -c '$(PY_OK)' 2>/dev/null || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/pip-sync --quiet $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# The main job: every stage for an LSTM and a transformer (quickstart.yaml).
quickstart: venv
	$(BIN)/lmstack pipeline --config=quickstart.yaml

# Every test, the ones marked slow included (`-m "not slow"` leaves them out
# for a quick check), in one pytest session over two processes, one test file
# at a time each (`--dist loadfile`): a file's module fixtures (trained runs,
# exports) are built once for its fast and slow tests alike, and test_train's
# multi-worker tests never overlap one another. Files go out longest first
# (tests/conftest.py's LONGEST_FIRST, kept by).
test: venv
	$(BIN)/python -m pytest -q --durations=15 -n 2 --dist loadfile

# ruff, as configured in pyproject.toml; CI (.ci/run) runs it before the tests.
lint: venv
	$(BIN)/ruff check .

# The newest versions setup.cfg's ranges allow, in a venv of their own, against the fast tests:
# the next breaking release turns this job red before it reaches a user. It changes nothing locked.
LATEST := .venv-latest
test-latest:
	$(CHECK_PYTHON)
	rm -rf $(LATEST) && $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[test]'
	$(LATEST)/bin/lmstack doctor --lock=$(LOCK)  # what moved past the lock, and the runtimes' smoke tests
	LMSTACK_UNLOCKED=1 $(LATEST)/bin/python -m pytest -q -m "not slow" -n 2 --dist loadfile

# Regenerates the locks on purpose, with pip's own resolver (pip-tools); every pin the lock has
# stays unless asked: `make lock ARGS='--upgrade-package numpy'` moves one (and what it needs),
# `make lock ARGS=--upgrade` moves all. The GPU set is the lock plus CUDA (requirements/gpu.in).
LOCK_FLAGS = --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links $(ARGS)
lock: venv
	$(BIN)/pip-compile $(LOCK_FLAGS) --extra test --extra dev --output-file $(LOCK) setup.cfg
	$(BIN)/pip-compile $(LOCK_FLAGS) --extra gpu --extra test --extra dev --output-file requirements/gpu.txt setup.cfg requirements/gpu.in

# Every benchmark, its table copied to bench/results/NAME.md next to its JSON,
# then one page of all of them: bench/results/SUMMARY.md.
BENCHES := pipeline_throughput train_speed precision generation_speed export_latency served_generation concurrent_generation openai_api serve_load quality optimize edge finetune lora

# bench/quality.py's reference GPT needs torch (the `reference` extra): the CPU build on these
# machines' disk, beside the lock without hashes (that file's hash is not PyPI's CUDA build's);
# the lock keeps every pin it shares.
bench: venv
	grep -E '^[A-Za-z0-9_.-]+==' $(LOCK) | sed 's/ *\\$$//' > $(VENV)/constraints.txt  # the lock's pins, no hashes
	$(BIN)/python -m pip install --quiet --no-build-isolation -c $(VENV)/constraints.txt -e '.[reference]'
	set -o pipefail; for b in $(BENCHES); do \
	  case $$b in quality) args=--reuse;; finetune) args=--in_domain;; *) args=;; esac; \
	  $(BIN)/python bench/$$b.py $$args | tee bench/results/$$b.md || exit 1; \
	done
	$(BIN)/python bench/summary.py $(BENCHES)

clean:
	rm -rf $(VENV) $(LATEST) runs .pytest_cache *.egg-info
