# The two set-up commands of the README: `make demo` and `make test`.
VENV ?= .venv

.PHONY: setup test test-fast demo lint typecheck bench

setup:
	./scripts/setup

test: setup
	$(VENV)/bin/python -m pytest

test-fast: setup
	$(VENV)/bin/python -m pytest tests/unit features scorers stream

demo: setup
	$(VENV)/bin/segstream demo

lint:
	$(VENV)/bin/ruff check .

typecheck:
	$(VENV)/bin/mypy

bench: setup
	$(VENV)/bin/segstream bench
