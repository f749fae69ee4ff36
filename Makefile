# The README's two commands: `make quickstart` and `make test`.
# Each creates .venv with the project and its pinned dependencies if missing.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: quickstart test bench venv clean
SHELL := /bin/bash

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# The main job: every stage for an LSTM and a transformer (quickstart.yaml).
quickstart: venv
	$(BIN)/lmstack pipeline --config=quickstart.yaml

# Every test, the ones marked slow included (`-m "not slow"` leaves them out
# for a quick check), in one pytest session over two processes, one test file
# at a time each (`--dist loadfile`): a file's module fixtures (trained runs,
# exports) are built once for its fast and slow tests alike, and test_train's
# multi-worker tests never overlap one another.
test: venv
	$(BIN)/python -m pytest -q --durations=15 -n 2 --dist loadfile

# Every benchmark, its table copied to bench/results/NAME.md next to its JSON,
# then one page of all of them: bench/results/SUMMARY.md.
BENCHES := pipeline_throughput train_speed precision generation_speed export_latency served_generation serve_load quality optimize edge finetune

bench: venv
	$(BIN)/python -m pip install --quiet -e '.[reference]'
	set -o pipefail; for b in $(BENCHES); do \
	  case $$b in quality) args=--reuse;; finetune) args=--in_domain;; *) args=;; esac; \
	  $(BIN)/python bench/$$b.py $$args | tee bench/results/$$b.md || exit 1; \
	done
	$(BIN)/python bench/summary.py $(BENCHES)

clean:
	rm -rf $(VENV) runs .pytest_cache *.egg-info
