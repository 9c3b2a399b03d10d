# Two commands on a fresh machine: `make demo` and `make test`.
# Both bootstrap .venv with pip from requirements.lock (pip takes torch/torchvision from local disk).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast mutate bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

demo: setup
	$(BIN)/blip3 demo

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

# Mutation testing (slow, not in CI): kill rate per module -> benchmarks/results/mutation.md.
# `make mutate MODULES="core/shards.py core/sql.py"` for a few; see docs/testing.md.
mutate: setup
	nice -n 10 $(BIN)/python -m benchmarks.mutate $(or $(MODULES),--all)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
