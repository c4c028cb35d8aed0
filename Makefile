# The commands a user runs; README.md explains each.
SHELL := /bin/bash
PY = $(shell bash setup_env.sh --print-python)
DATA ?=

.PHONY: setup test lint format bench demo

setup:
	@bash setup_env.sh

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

format: setup
	$(PY) -m ruff format src tests benchmarks
	$(PY) -m ruff check --fix src tests benchmarks

bench: setup
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

demo: setup
	@PY="$(PY)" bash scripts/demo.sh "$(DATA)"
