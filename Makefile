# jr: `make run` (the demo service) and `make test` (everything, from a fresh machine).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint format bench soak images prereqs clean completions venv

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { \
	  echo "make: cannot create a venv: install python3-venv (apt-get install python3-venv)" >&2; exit 1; }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

prereqs: venv
	scripts/test-prereqs

images:
	scripts/build-images

run: venv
	scripts/ensure-docker
	scripts/build-images
	scripts/run-demo

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/mypy

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

completions: venv
	$(PY) -m jobrunner_lib.cli.completion > completions/jr.bash

test: prereqs lint
	$(VENV)/bin/pytest -q -p no:cacheprovider

soak: prereqs
	JR_SOAK=1 JR_CRASH_KILLS=50 $(VENV)/bin/pytest -q -p no:cacheprovider tests/reliability

bench: prereqs
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) workdir build *.egg-info .pytest_cache .ruff_cache .hypothesis
