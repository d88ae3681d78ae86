# `make setup` builds .venv; `make test` runs the test suite. The README and .ci/run call exactly these.
PY ?= python3.11
VENV = .venv
BIN = $(VENV)/bin

.PHONY: setup test
setup:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'

test:
	$(BIN)/python -m pytest -q
