# inferq: `make demo` runs the main job end to end, `make test` runs the whole suite.
# Both create (or reuse) a virtual environment cached outside the repository.

PYTHON ?= python3
CACHE_DIR ?= $(HOME)/.cache/inferq
TORCH_PIN := $(shell sed -n 's/.*"torch==\([^"]*\)".*/\1/p' pyproject.toml)
PY_TAG := $(shell $(PYTHON) -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')
# The environment is keyed on the Python and torch versions (torch is the multi-GB part) and
# holds the dependencies only: every target runs from this checkout (python -m ...), so one
# environment serves every checkout. The stamp re-runs pip whenever pyproject.toml changes.
VENV ?= $(CACHE_DIR)/venv-$(PY_TAG)-torch$(TORCH_PIN)
SPEC_HASH := $(shell sha256sum pyproject.toml | cut -c1-16)
STAMP := $(VENV)/.inferq-$(SPEC_HASH)
PY := $(VENV)/bin/python
STACK := $(PY) -m deploy.local.stack
PYTEST_ARGS ?=

export INFERQ_CACHE_DIR := $(CACHE_DIR)

.PHONY: help venv bench-venv demo test soak lint typecheck unit stack-up stack-down stack-status \
	bench bench-quick bench-gpu bench-formats clean

help:
	@echo "make demo        start Kafka + Redis, run the end-to-end demo, stop them"
	@echo "make test        lint, type-check and run the whole test suite on a private stack"
	@echo "make soak        the fault suite's full-length variants (tests/faults, marker soak)"
	@echo "make lint        ruff, hadolint, k8s manifests and compose.yaml against their schemas"
	@echo "make typecheck   mypy --strict on workers/ producers/ schemas/"
	@echo "make unit        the unit tests only (no Kafka, no Redis)"
	@echo "make stack-up | stack-down | stack-status   the local stack on ports 9092/9093/6379"
	@echo "make bench       codec + end-to-end benchmarks, ~15 min (not part of make test)"
	@echo "make bench-quick the end-to-end benchmark on 20,000 requests, ~4 min"
	@echo "make bench-gpu   batcher + runner against the raw forward on a CUDA GPU"
	@echo "make bench-formats  load time and throughput of the example CNN per model format"

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# An editable install left by an older Makefile pointed the environment at one checkout.
	@$(PY) -m pip uninstall -q -y inferq 2>/dev/null || true
	$(PY) deploy/local/requirements.py dev > $(VENV)/requirements-dev.txt
	$(PY) -m pip install -q -r $(VENV)/requirements-dev.txt
	@rm -f $(VENV)/.inferq-*
	@touch $@

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint deploy/docker/Dockerfile
	$(PY) -m deploy.validate

typecheck: venv
	$(VENV)/bin/mypy

unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# The tests start their own Kafka and Redis on free ports (tests/conftest.py) and stop
# them at the end, whatever the outcome; `stack install` fetches what they need first.
test: venv
	$(STACK) install
	$(MAKE) --no-print-directory lint typecheck
	$(PY) -m pytest -m "not soak" $(PYTEST_ARGS)

# The fault suite's long variants (60 s of large tensors, 8 SIGKILLs, a 3-node cluster); each appends its row of figures to
# $(CACHE_DIR)/faults/results.jsonl, as the short ones in make test do.
soak: venv
	$(STACK) install
	$(PY) -m pytest -m soak tests/faults $(PYTEST_ARGS)

demo: venv
	$(PY) -m deploy.local.demo

stack-up: venv
	$(STACK) up

stack-down: venv
	$(STACK) down

stack-status: venv
	$(STACK) status

# The bench extra adds the framework peers (FastStream), matplotlib and py-spy.
BENCH_STAMP := $(VENV)/.inferq-bench-$(SPEC_HASH)
bench-venv: $(BENCH_STAMP)

$(BENCH_STAMP): $(STAMP)
	$(PY) deploy/local/requirements.py dev bench > $(VENV)/requirements-bench.txt
	$(PY) -m pip install -q -r $(VENV)/requirements-bench.txt
	@touch $@

bench: bench-venv
	$(PY) bench/codec.py
	$(PY) bench/e2e.py --scenario all

bench-quick: bench-venv
	$(PY) bench/e2e.py --scenario all --count 20000 --latency-seconds 8

bench-gpu: bench-venv
	$(PY) bench/gpu.py

bench-formats: venv
	$(PY) bench/formats.py

clean:
	rm -rf .stack .mypy_cache .ruff_cache .pytest_cache .hypothesis
