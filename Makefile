# The two set-up commands of the README: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

# Outside CI, `make test` skips the tests marked slow; CI (CI=true) runs every test.
PYTEST_MARK := $(if $(filter true,$(CI)),,-m "not slow")

.PHONY: install install-test demo test lint bench

install:
	VENV=$(VENV) bash scripts/setup.sh

install-test:
	VENV=$(VENV) EXTRAS=test bash scripts/setup.sh

demo: install
	$(VENV)/bin/closedloop demo

test: install-test
	$(PY) -m pytest -q $(PYTEST_MARK)

lint: install-test
	$(VENV)/bin/ruff check closedloop scripts tests
	$(VENV)/bin/ruff format --check closedloop scripts tests

bench: install
	$(PY) scripts/bench_read.py
