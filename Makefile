# Two commands for a fresh machine with Python 3.11+ and make: `make demo`, `make test`.
# Both create or reuse .venv and install the pinned requirements.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-pg bench-targets clean

$(STAMP): pyproject.toml requirements/dev.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements/dev.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rulebound demo

# mypy cannot follow setuptools' editable import hook, so it reads the package through a tree
# of links laid out as it installs: rulebound/{domain,engine,adapters} and the face's files.
TYPECHECK := $(VENV)/typecheck

lint: $(STAMP)
	$(PY) -m ruff check .
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/rulebound
	for d in domain engine adapters; do ln -s $(CURDIR)/$$d $(TYPECHECK)/rulebound/$$d; done
	for f in rulebound/*.py rulebound/py.typed; do ln -s $(CURDIR)/$$f $(TYPECHECK)/rulebound/; done
	MYPYPATH=$(TYPECHECK) $(PY) -m mypy -p rulebound
	# The README's and docs' Python blocks, as modules (tests/docs/test_examples.py runs them).
	$(PY) tests/docs/examples.py $(TYPECHECK)/examples > /dev/null
	cd $(TYPECHECK)/examples && MYPYPATH=$(CURDIR)/$(TYPECHECK) $(CURDIR)/$(PY) -m mypy \
		--config-file $(CURDIR)/pyproject.toml --strict --follow-imports=silent *.py

# lint (ruff, and mypy over the package and the docs' examples) takes seconds, so it gates the tests.
# The console's browser tests drive Debian's chromium through Playwright (a browser download
# does not work here): install it when it is missing (root, or sudo).
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	@echo "installing Debian's chromium for the console's browser tests"
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(if $(filter 0,$(shell id -u)),,sudo) \
		apt-get install -y -qq chromium >/dev/null

test: $(STAMP) lint $(CHROMIUM)
	$(PY) -m pytest

# Benchmarks against the peers (not part of `make test`): a separate venv, so the peers' own
# dependencies never touch .venv. BENCH_REPEAT=5 / BENCH_ARGS="--workloads W1,W2" to vary.
# `make bench-pg`: only PG, 1/2/4 engine processes on one throwaway PostgreSQL beside DBOS.
BENCH_VENV := .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed

$(BENCH_STAMP): pyproject.toml requirements/bench.lock
	test -x $(BENCH_PY) || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install --quiet --disable-pip-version-check -r requirements/bench.lock
	$(BENCH_PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(BENCH_STAMP)

# `make bench` then runs benchmarks/targets.py: issue 15's scale figures (100,000 parked runs,
# 10,000 in flight, archive, soak over HTTP, start-up, loading) each in a fresh process, and
# one table of every issue-15 target, W1-W3 read from the peers.json run.py just wrote
# (results/targets.json; 20+ minutes). Those scripts need only rulebound, so they run in .venv
# (the soak's `rulebound serve` is the one next to that interpreter).
# `make bench-targets`: targets.py alone (TARGETS_ARGS="--quick" or "--only soak,startup").
bench: $(BENCH_STAMP) $(STAMP)
	$(BENCH_PY) benchmarks/run.py $(BENCH_ARGS)
	$(PY) benchmarks/targets.py $(TARGETS_ARGS)

bench-targets: $(STAMP)
	$(PY) benchmarks/targets.py $(TARGETS_ARGS)

bench-pg: $(BENCH_STAMP)
	$(BENCH_PY) benchmarks/run.py --workloads PG $(BENCH_ARGS)

clean:
	rm -rf $(VENV) rulebound.db rulebound.db-wal rulebound.db-shm .pytest_cache .hypothesis
