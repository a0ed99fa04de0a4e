# spendgate: `make run` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Two install stamps: `make run` needs only the services' dependencies; tests
# and lint add the dev extra (SDKs, pytest, ruff, mypy) on top.
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev
# Extra `spendgate up` options: make run ARGS='--config spendgate.yaml'
ARGS ?=

.PHONY: run test lint docs fuzz proto bench wrk install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

# The dev extra includes every runtime dependency: `make run` after it installs nothing.
$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(RUN_STAMP)

install: $(RUN_STAMP)

install-dev: $(DEV_STAMP)

run: $(RUN_STAMP)
	$(BIN)/spendgate up --demo $(ARGS)

test: $(DEV_STAMP) wrk
	$(BIN)/pytest -q

# The fuzz harness (tests/fuzz/) for SPENDGATE_FUZZ_SECONDS (default 10 minutes);
# make test runs its short profile.
SPENDGATE_FUZZ_SECONDS ?= 600
fuzz: $(DEV_STAMP)
	SPENDGATE_FUZZ_PROFILE=fuzz SPENDGATE_FUZZ_SECONDS=$(SPENDGATE_FUZZ_SECONDS) $(BIN)/pytest -q -s -p no:cacheprovider tests/fuzz

# Material for MkDocs prints a banner about its successor on every build.
export NO_MKDOCS_2_WARNING := 1

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy spendgate control_plane ext_proc
	@# not --quiet: it hides the warnings that --strict turns into failures
	out=$$(mktemp -d) && $(BIN)/mkdocs build --strict --site-dir $$out; \
		status=$$?; rm -rf $$out; exit $$status

# The documentation site (mkdocs.yml, docs/) into site/, after regenerating its
# reference pages from the code (spendgate/docgen.py; a test fails when they are
# stale). `make lint` builds it with --strict (a broken link or anchor fails)
# into a scratch folder.
docs: $(DEV_STAMP)
	$(BIN)/python -m spendgate.docgen
	$(BIN)/mkdocs build --strict

proto: $(RUN_STAMP)
	$(BIN)/python -m spendgate.protogen

# wrk (Debian's package) drives the load (make bench, tests/bench); installed
# here when missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
wrk:
	@command -v wrk >/dev/null || $(SUDO) apt-get install -y -qq wrk \
		|| { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wrk; }

# Then the work that grows with the size of the state (bench/scale.py; its
# sizes: BENCH_SCALE_POLICIES, BENCH_SCALE_MEMBERS; BENCH_QUICK=1 the smallest).
bench: $(DEV_STAMP) wrk
	$(BIN)/python -m bench
	$(BIN)/python -m bench scale

clean:
	rm -rf $(VENV) .spendgate .pytest_cache .mypy_cache .ruff_cache site
