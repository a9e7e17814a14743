# PathoSCOPE. `make help` lists the targets; the two that matter first are `make train` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

DATASET ?= demo
SHOTS ?= 2
REPEATS ?= 1
CONFIG ?=
DATA_ROOT ?=
LOGGER ?= csv
OVERWRITE ?=
WEIGHTS ?=
RUNS ?= runs/$(DATASET)
SWEEP ?= experiments/sweeps/eta.yaml

.DEFAULT_GOAL := help
.PHONY: help install train table grid sweep test bench peers lint

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-8s\033[0m %s\n", $$1, $$2}'
	@echo "  variables: DATASET=demo|brats|chestxray8 SHOTS=K REPEATS=N DATA_ROOT=DIR CONFIG=NAME LOGGER=csv|wandb OVERWRITE=1"
	@echo "             WEIGHTS=resnet18.pth (real data: a local ResNet18 state dict, unless timm's weights are cached)"

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install -c constraints.txt -e '.[test]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv/ (torch pinned via constraints.txt) and install the project editable with test extras

train: $(STAMP) ## fit + test seeds 0..REPEATS-1 (DATASET=demo by default: synthetic BraTS, K=2, 128 px) and print the table; OVERWRITE=1 replaces finished seeds
	$(BIN)/pathoscope train --dataset $(DATASET) --shots $(SHOTS) --repeats $(REPEATS) \
		$(if $(CONFIG),--config-name $(CONFIG)) $(if $(DATA_ROOT),--data-root $(DATA_ROOT)) --logger $(LOGGER) \
		$(if $(WEIGHTS),--model.network.weights=$(WEIGHTS)) $(if $(OVERWRITE),--overwrite)

table: $(STAMP) ## gather every config and K under RUNS=runs/<dataset> into one Markdown table + CSV
	$(BIN)/pathoscope table --runs $(RUNS)

grid: $(STAMP) ## local parameter grid without any account, e.g. ARGS="--dataset demo --param model.pieg.eta=0.01,0.05 --shots 2"
	$(BIN)/pathoscope grid $(ARGS)

sweep: $(STAMP) ## create the W&B sweep SWEEP=experiments/sweeps/eta.yaml and start an agent (needs a W&B server/account; edit --data-root in the file)
	$(BIN)/wandb sweep $(SWEEP) 2>&1 | tee $(VENV)/.sweep.log
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/wandb agent $$(grep -oE 'wandb agent \S+' $(VENV)/.sweep.log | tail -1 | cut -d' ' -f3)

test: $(STAMP) ## run the test suite (all but GPU tests without CUDA)
	$(BIN)/pytest -q tests

bench: $(STAMP) ## speed and cost benchmarks, side by side in one run; writes bench.json
	$(BIN)/pathoscope bench $(if $(WEIGHTS),--weights $(WEIGHTS))

PEERS_VENV := .venv-peers
SEEDS ?= 0,1,2
PEERS_DATA ?= data/anatomy

$(PEERS_VENV)/.installed: constraints-peers.txt
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/pip install -c constraints-peers.txt torch torchvision anomalib
	@touch $@

$(PEERS_DATA):
	$(BIN)/pathoscope make-demo-data --dataset brats --kind anatomy --out $(PEERS_DATA)

PEERS_CONFIGS ?= pathoscope,anchor_knn,glass_hypersphere,glass_manifold

peers: $(STAMP) $(PEERS_VENV)/.installed $(if $(DATA_ROOT),,$(PEERS_DATA)) ## PathoSCOPE, anchor_knn, GLASS, anomalib PatchCore/PaDiM on one BraTS split (default: the anatomy benchmark, random backbone unless WEIGHTS=; SHOTS=2 SEEDS=0,1,2 PEERS_CONFIGS=...)
	$(BIN)/python benchmarks/peers.py --data-root $(or $(DATA_ROOT),$(PEERS_DATA)/MICCAI_BraTS2020_TrainingData) \
		--shots $(SHOTS) --seeds $(SEEDS) --configs $(PEERS_CONFIGS) --peers-python $(PEERS_VENV)/bin/python \
		$(if $(WEIGHTS),--model.network.weights=$(WEIGHTS),--model.network.pretrained=false) $(ARGS)

lint: $(STAMP) ## ruff check + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
