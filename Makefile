# Two commands do all set-up on a fresh machine (Debian 12, Python 3.11):
#   make run    install, then run the main job
#   make test   install (with dev tools and system packages), then lint, type-check and test
# Everything installs into .venv with the exact versions of constraints.txt (torch 2.13.0 CPU).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
ERC := $(BIN)/erc
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends
# Debian packages the tests use: Fashion-MNIST (the second dataset on this machine).
SYSTEM_PACKAGES := dataset-fashion-mnist
PYTEST_ARGS ?=

.PHONY: run test install install-dev system-deps lint typecheck unit clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.stamp-run: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install --quiet -c constraints.txt -e .
	touch $@

$(VENV)/.stamp-dev: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	touch $@ $(VENV)/.stamp-run

install: $(VENV)/.stamp-run
install-dev: $(VENV)/.stamp-dev

system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(APT_INSTALL) $$missing || { $(SUDO) apt-get update && $(APT_INSTALL) $$missing; }; \
	fi

# The main job: train a small ER-Classifier on MNIST on the CPU (about a minute), attack it with
# PGD, and export it to model_store/quickstart.
run: install
	$(ERC) train --config training/configs/quickstart.yaml
	$(ERC) eval runs/quickstart --eps 0,0.1,0.2,0.3 --steps 20 --n 1000 --out runs/quickstart/eval
	$(ERC) export runs/quickstart --name quickstart --eval-n 2000

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install-dev
	$(BIN)/mypy

unit: install-dev system-deps
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck unit

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
