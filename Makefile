# spendgate: `make run` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint fuzz proto bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/spendgate up --demo

test: $(STAMP)
	$(BIN)/pytest -q

# The fuzz harness (tests/fuzz/) for SPENDGATE_FUZZ_SECONDS (default 10 minutes);
# make test runs its short profile.
SPENDGATE_FUZZ_SECONDS ?= 600
fuzz: $(STAMP)
	SPENDGATE_FUZZ_PROFILE=fuzz SPENDGATE_FUZZ_SECONDS=$(SPENDGATE_FUZZ_SECONDS) $(BIN)/pytest -q -s -p no:cacheprovider tests/fuzz

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy spendgate control_plane ext_proc

proto: $(STAMP)
	$(BIN)/python -m spendgate.protogen

# wrk (Debian's package) drives the load; installed here when missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
bench: $(STAMP)
	@command -v wrk >/dev/null || $(SUDO) apt-get install -y -qq wrk \
		|| { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wrk; }
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .spendgate .pytest_cache .mypy_cache .ruff_cache
