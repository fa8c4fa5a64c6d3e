# The two set-up commands of the README: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install install-test demo test bench

install:
	VENV=$(VENV) bash scripts/setup.sh

install-test:
	VENV=$(VENV) EXTRAS=test bash scripts/setup.sh

demo: install
	$(VENV)/bin/closedloop demo

test: install-test
	$(PY) -m pytest -q

bench: install
	$(PY) scripts/bench_read.py
