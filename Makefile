# fedsafe: `make demo` and `make test` start from a clean clone.
PYTHON ?= $(shell command -v python3.11 >/dev/null 2>&1 && echo python3.11 || echo python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck install nginx browser bench-heart bench-compression bench-transport clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "fedsafe needs $(PYTHON) (set PYTHON=...)"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build on disk; an open range would pull CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) nginx

# nginx from the distribution's registry: the coordinator's Fleet-only TLS proxy (issue 11).
# Without it the proxy tests skip with a reason and `coordinator start` says how to install it.
nginx:
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || { \
	  (apt-get update -qq && { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light \
	    || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx; } >/dev/null) \
	  || echo "nginx could not be installed: the Fleet proxy tests will be skipped"; }

demo: $(STAMP)
	$(VENV)/bin/fedsafe simulate --scenario heart --epsilon 1 --delta 1e-4

lint: $(STAMP)
	$(VENV)/bin/ruff check fedsafe tests bench examples
	$(VENV)/bin/ruff format --check fedsafe tests bench examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: $(STAMP) nginx lint typecheck
	$(PY) -m pytest -q -rs --durations=25

# Headless Chromium for the report screenshot test (skipped with a reason when absent).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) \
	  || echo "chromium could not be installed: the report screenshot test will be skipped"; }

bench-heart: $(STAMP)
	$(PY) bench/heart_table.py

bench-compression: $(STAMP)
	$(PY) bench/compression.py

bench-transport: $(STAMP)
	$(PY) bench/transport.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
