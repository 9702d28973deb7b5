VENV := .venv
PY := $(VENV)/bin/python

.PHONY: help setup demo test test-unit lint bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: ## virtualenv, dependencies, system packages (as root) and the Kafka jars
	@bash scripts/setup.sh

demo: setup ## the main job: local Kafka broker, collector, generated traffic, window results
	$(VENV)/bin/kdwatch demo

test: setup lint ## lint, then the whole suite, integration tests against real Kafka and PostgreSQL included
	$(PY) -m pytest -q -p no:cacheprovider tests

test-unit: setup ## unit tests only (no services)
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

lint: setup ## ruff and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean: ## remove local state (virtualenv kept)
	rm -rf .kdwatch kdwatch.db
