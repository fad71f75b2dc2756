# The README's two commands are `make demo` and `make test`; both set up .venv on a fresh machine first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test lint weights bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=26"
	# the CPU torch 2.13.0 first (a wheel on disk on these machines); the constraint then holds it
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[pipeline,test,k8s]"
	touch $@

demo: setup  ## the embedded default end to end: fetch -> value -> CTRL -> evaluate -> MLflow registry
	$(VENV)/bin/ctrl run --summary-out outputs/summary.json

# the code ruff formats and lints (format and lint are checked before the tests: CI fails on either)
CODE := ctrl_core components pipelines bench tests tools

test: setup
	$(VENV)/bin/ruff format --check $(CODE)
	$(VENV)/bin/ruff check $(CODE)
	$(PY) -m pytest -q

lint: setup  ## format the code, then lint it
	$(VENV)/bin/ruff format $(CODE)
	$(VENV)/bin/ruff check $(CODE)

weights: setup  ## rebuild the shipped embedded-default weights (about 20 min on 2 cores)
	$(PY) -m ctrl_core.embedded
