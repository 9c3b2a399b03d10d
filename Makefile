# Two commands on a fresh machine: `make demo` and `make test`.
# Both bootstrap .venv with pip from requirements.lock (pip takes torch/torchvision from local disk).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup browser java demo test test-fast mutate bench clean

setup: $(STAMP)

# The audit-page tests drive Debian's headless chromium: install it when missing (as root, or
# through sudo), so `make test` passes on a fresh machine as it stands.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  echo "installing chromium (apt-get) for the browser tests"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; \
	} || { echo "error: the browser tests need chromium; apt-get install chromium failed" >&2; exit 1; }

# pycocoevalcap's PTB tokenizer and METEOR (the captioning scores of `blip3 eval`) are Java
# programs: install a headless JRE when `java` is missing, the same way.
java:
	@command -v java >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  echo "installing a Java runtime (apt-get) for the captioning tests"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq default-jre-headless >/dev/null; \
	} || { echo "error: the captioning tests need Java; apt-get install default-jre-headless failed" >&2; exit 1; }

# requirements-lmms.lock goes in without its dependencies: lmms-eval pins a wandb older than this
# tree's, and its evaluator needs only the few packages listed there (docs/evaluation.md).
$(STAMP): pyproject.toml requirements.lock requirements-lmms.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -r requirements-lmms.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

demo: setup
	$(BIN)/blip3 demo

test: setup browser java
	$(BIN)/python -m pytest

test-fast: setup browser java
	$(BIN)/python -m pytest -m "not slow"

# Mutation testing (slow, not in CI): kill rate per module -> benchmarks/results/mutation.md.
# `make mutate MODULES="core/shards.py core/sql.py"` for a few; see docs/testing.md.
mutate: setup
	nice -n 19 $(BIN)/python -m benchmarks.mutate $(or $(MODULES),--all)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
