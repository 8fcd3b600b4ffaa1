# Two commands a newcomer runs on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest redis-server clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

redis-server:
	@bash scripts/ensure-redis.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP) redis-server
	$(PY) -m pytest -q $(PYTEST_ARGS)

test: lint typecheck pytest

demo: $(STAMP) redis-server
	$(PY) -m orchestrator.demo

clean:
	rm -rf $(VENV) .refitd .pytest_cache .mypy_cache .ruff_cache
