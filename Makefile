VENV := .venv
PY := $(VENV)/bin/python

.PHONY: help setup demo test test-unit lint bench soak clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: ## virtualenv, dependencies, system packages (as root) and the Kafka jars
	@bash scripts/setup.sh

demo: setup ## the main job: the closed loop on scikit-learn digits (shift, page, retrain, recovery), under a minute
	$(VENV)/bin/kdwatch demo

test: setup lint ## lint, then the whole suite, integration tests against real Kafka and PostgreSQL included
	$(PY) -m pytest -q -p no:cacheprovider tests

test-unit: setup ## unit tests only (no services)
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

lint: setup ## ruff, mypy and the layer contracts (import-linter)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

soak: setup ## the longest reliability runs: kill -9 five times while 200,000 predictions flow; 80 live-equivalence runs (20 seeds x 4 modes)
	KDWATCH_CRASH_PREDICTIONS=200000 $(PY) -m pytest -q -p no:cacheprovider tests/integration/test_crash_recovery.py
	KDWATCH_LIVE_SEEDS=20 $(PY) -m pytest -q -p no:cacheprovider tests/integration/test_live_equivalence.py

clean: ## remove local state (virtualenv kept)
	rm -rf .kdwatch kdwatch.db

bench: setup ## benchmarks (see benchmarks/RESULTS.md); Evidently in its own virtualenv
	@.venv-bench/bin/python -c "import evidently, pyarrow, orjson" 2>/dev/null || (python3 -m venv .venv-bench && .venv-bench/bin/pip install -q "evidently>=0.7,<0.8" "pandas<3" orjson pyarrow)
	@command -v wrk >/dev/null || (test "$$(id -u)" = 0 && apt-get install -y -qq wrk >/dev/null) || (echo "install wrk (Debian package wrk)" && exit 1)
	cd benchmarks && ../$(PY) analyze_vs_peers.py
	cd benchmarks && ../$(PY) api_latency.py
	cd benchmarks && ../$(PY) sdk_overhead.py
	cd benchmarks && ../$(PY) ingest.py
	cd benchmarks && ../$(PY) detection.py
	cd benchmarks && ../$(PY) alert_quality.py
	cd benchmarks && ../$(PY) freshness.py
	cd benchmarks && ../$(PY) scrape_latency.py
	cd benchmarks && ../$(PY) generative_throughput.py
	cd benchmarks && ../$(PY) spark_scale.py
	@test -x $(VENV)/bin/py-spy || $(VENV)/bin/pip install -q py-spy
	cd benchmarks && ../$(PY) profile_collector.py
	cd benchmarks && ../$(PY) profile_analyze.py
	cd benchmarks && ../$(PY) memory.py
