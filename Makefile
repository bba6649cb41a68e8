# healthflow — two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench reliability services clean

$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

services:
	@bash .ci/ensure-services
	@bash .ci/ensure-browser

demo: install
	$(BIN)/healthflow demo

test: install services lint
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench: install
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# every fault at full size; it starts its own broker, PostgreSQL cluster (the machine's initdb/pg_ctl), servers
# (RELIABILITY_ARGS: --quick, --only kill-batch,webhook-down, --webhook-down-s 300, --json FILE, ...)
reliability: install
	$(BIN)/python -m reliability.run $(RELIABILITY_ARGS)

clean:
	rm -rf $(VENV) .healthflow demo-output .pytest_cache .import_linter_cache
