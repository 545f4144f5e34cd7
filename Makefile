# The two commands the README promises: `make run` and `make test`.
# Both bootstrap what they need first (scripts/bootstrap.sh), so they work on a fresh clone.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test bootstrap-run bootstrap-test lint typecheck unit integration k8s clean

run: bootstrap-run
	$(BIN)/turnstorm run

test: bootstrap-test lint typecheck
	$(BIN)/python -m pytest

bootstrap-run:
	@scripts/bootstrap.sh run

bootstrap-test:
	@scripts/bootstrap.sh test

lint:
	$(BIN)/ruff check .

typecheck:
	$(BIN)/mypy

unit:
	$(BIN)/python -m pytest tests/unit

integration:
	$(BIN)/python -m pytest tests/integration

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build *.egg-info
