# The two commands the README promises: `make run` and `make test`.
# Both bootstrap what they need first (scripts/bootstrap.sh), so they work on a fresh clone.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test image cluster-up cluster-down bootstrap-run bootstrap-test lint typecheck unit integration k8s node clean

run: bootstrap-run
	$(BIN)/turnstorm run

test: bootstrap-test lint typecheck
	$(BIN)/python -m pytest

# The turnstorm and relay images (images/*.Containerfile) from a Debian base made of
# Debian packages; with podman or docker where one runs, else buildah. Prints where the
# OCI archives are (README, "Images").
image:
	@scripts/bootstrap.sh image
	scripts/build-images.sh

# A single-node cluster on this machine (the node test tier's), and its teardown.
cluster-up: bootstrap-test
	scripts/cluster.sh up

cluster-down:
	scripts/cluster.sh down

bootstrap-run:
	@scripts/bootstrap.sh run

bootstrap-test:
	@scripts/bootstrap.sh test

lint:
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache

typecheck:
	$(BIN)/mypy

unit:
	$(BIN)/python -m pytest tests/unit

integration:
	$(BIN)/python -m pytest tests/integration

node:
	$(BIN)/python -m pytest tests/node

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build *.egg-info
