# qt: make help lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is installed first, so that qt's dependencies pull no other build. Which build pip
# picks depends on where it looks: a wheel in pip's find-links (a machine that keeps the CPU
# wheel 2.13.0+cpu on disk) wins; from PyPI, Linux x86_64 torch==2.13.0 is the CUDA build,
# which pulls the nvidia-* CUDA wheels (GBs) and runs on CPU-only machines too. For the CPU
# build from the network: make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu (or the
# .../whl/cuXYZ index of the CUDA you want; see pytorch.org). TORCH is the requirement.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
export MPLBACKEND ?= Agg

.PHONY: help setup demo test test-all data study report bench lint format ui clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q '$(TORCH)' $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install qt with dev tools (quick when done)

demo: setup  ## generate (or reuse) maze2d-medium data, train QT and the DT baseline, evaluate
	$(BIN)/python -m qt.demo

test: setup  ## the fast test suite (what CI runs)
	$(BIN)/python -m pytest -q

test-all: setup  ## every test this machine can run, slow ones included
	$(BIN)/python -m pytest -q -m "not gpu or gpu"

data: setup  ## generate the maze2d-umaze dataset at D4RL's size (1M steps; Minari + hdf5 in ./data; kept when there)
	$(BIN)/python -m qt.datagen maze2d-umaze-v1

study: setup  ## run or resume a study: make study STUDY=configs/studies/maze2d-umaze-cpu.yaml [SEEDS="2 3"]
	@test -n "$(STUDY)" || { echo "error: STUDY=<study file> is required, e.g. STUDY=configs/studies/maze2d-umaze-cpu.yaml"; exit 2; }
	$(BIN)/python -m qt.study run $(STUDY) $(if $(BACKEND),--backend $(BACKEND)) $(if $(SEEDS),--seeds $(SEEDS))

report: setup  ## write a study's report from MLflow: make report NAME=maze2d-umaze-cpu
	@test -n "$(NAME)" || { echo "error: NAME=<study name> is required, e.g. NAME=maze2d-umaze-cpu"; exit 2; }
	$(BIN)/python -m qt.study report $(NAME)

bench: setup  ## benchmarks: sampler (vs a per-sample loop), training step and acting (vs this machine's peak)
	$(BIN)/python -m bench

lint: setup  ## ruff lint and format check
	$(BIN)/ruff check qt tests bench cli.py
	$(BIN)/ruff format --check qt tests bench cli.py

format: setup  ## ruff format in place
	$(BIN)/ruff format qt tests bench cli.py
	$(BIN)/ruff check --fix qt tests bench cli.py

ui: setup  ## serve the MLflow UI for runs/ (or $MLFLOW_TRACKING_URI's store) on 127.0.0.1
	@case "$${MLFLOW_TRACKING_URI:-}" in \
	  http*) echo "Runs are on the tracking server $$MLFLOW_TRACKING_URI: open it in a browser." ;; \
	  sqlite:///*|"") $(BIN)/python -m qt.ui "$$(u=$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/runs/mlflow.db}; echo $${u#sqlite:///})" $${PORT:-5000}; \
	     $(BIN)/mlflow ui --backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/runs/mlflow.db}" \
	       --host 127.0.0.1 --port $${PORT:-5000} ;; \
	  *) $(BIN)/mlflow ui --backend-store-uri "$$MLFLOW_TRACKING_URI" --host 127.0.0.1 --port $${PORT:-5000} ;; \
	esac

clean:  ## remove run outputs (keeps .venv and data)
	rm -rf runs lightning_logs
