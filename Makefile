# Two commands for a newcomer: `make run` and `make test`. Each installs what it needs.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run stop test test-fast lint clean

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "needs $(PYTHON) on PATH"; exit 1; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

run: install
	$(BIN)/factory up

stop: install
	$(BIN)/factory down

test: install
	$(BIN)/factory policy test
	$(BIN)/pytest --durations=15

test-fast: install
	$(BIN)/pytest -m "not service and not browser and not slow"

lint: install
	$(BIN)/ruff check pipelines plugins dags tests benchmarks

clean:
	rm -rf .factory test-artifacts
