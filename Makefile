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
# Debian packages the tests use: Fashion-MNIST (the second dataset on this machine), Prometheus and
# nginx (the native stack: scraping, the proxy in front of the API replicas), PostgreSQL (the audit
# job store's tests start private clusters of it), Chromium (renders the audit report) with
# chromium-driver (Selenium drives it in the console's browser tests; no browser is downloaded); and
# those the container tests use:
# rootful podman with runc, debootstrap (offline base image), docker-compose (schema check), and the
# netavark network backend with aardvark-dns, so that containers resolve each other by name (the CNI
# plugins Debian installs by default have no DNS plugin); netavark programs iptables.
SYSTEM_PACKAGES := dataset-fashion-mnist prometheus nginx postgresql chromium chromium-driver
DEPLOY_PACKAGES := podman runc debootstrap docker-compose netavark aardvark-dns iptables
PYTEST_ARGS ?=
# Development data: full MNIST lies in ../shared/data/mnist beside a CI checkout. The package only
# searches its settings ($ERC_DATA_DIR, ./data, the user cache; README "Data"), so make points
# ERC_DATA_DIR there for `run`, the tests and the benchmarks, unless the caller set it.
SHARED_DATA := $(abspath ../shared/data)
ifneq ($(wildcard $(SHARED_DATA)),)
export ERC_DATA_DIR ?= $(SHARED_DATA)
endif

.PHONY: run test install install-dev system-deps deploy-deps lint typecheck unit deploy-test clean bench-serve bench-attack wheelhouse

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.stamp-run: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install --quiet -c constraints.txt -e .
	touch $@

$(VENV)/.stamp-dev: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	# torchattacks is the test-time reference for the attacks; --no-deps because it pins an old requests.
	$(PIP) install --quiet --no-deps -c constraints.txt torchattacks scipy
	touch $@ $(VENV)/.stamp-run

install: $(VENV)/.stamp-run
install-dev: $(VENV)/.stamp-dev

define apt_ensure
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(APT_INSTALL) $$missing || { $(SUDO) apt-get update && $(APT_INSTALL) $$missing; }; \
	fi
endef

system-deps:
	$(call apt_ensure,$(SYSTEM_PACKAGES))

deploy-deps:
	$(call apt_ensure,$(DEPLOY_PACKAGES))

# The main job: serve model_store/ (ERC_* variables configure it, see docs/api.md). With no model
# in the store yet, first train a small ER-Classifier on the CPU (about a minute) and export it.
# Without ERC_ADMIN_TOKEN, this run gets a random one, printed once, so that the console's audit
# panel works out of the box without a guessable default.
run: install
	@if ! ls model_store/*/card.json >/dev/null 2>&1; then \
	  echo "model_store/ holds no model: training the quickstart model first"; \
	  $(ERC) train --config training/configs/quickstart.yaml && \
	  $(ERC) export runs/quickstart --name quickstart --eval-n 2000 --robust-steps 20; \
	fi
	@if [ -z "$$ERC_ADMIN_TOKEN" ]; then \
	  export ERC_ADMIN_TOKEN="$$($(BIN)/python -c 'import secrets; print(secrets.token_urlsafe(18))')"; \
	  echo "admin token of this run (the console's Audits panel asks for it): $$ERC_ADMIN_TOKEN"; \
	fi; \
	echo "console: http://$${ERC_HOST:-127.0.0.1}:$${ERC_PORT:-8080}/"; \
	exec $(ERC) serve

# Benchmarks (bounded, loopback only; wrk from Debian). Results: docs/benchmarks.md.
bench-serve: install-dev
	@command -v wrk >/dev/null || $(APT_INSTALL) wrk
	$(BIN)/python bench/serve.py

bench-attack: install-dev
	@command -v wrk >/dev/null || $(APT_INSTALL) wrk
	$(BIN)/python bench/attack.py

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install-dev
	$(BIN)/mypy

unit: install-dev system-deps
	$(BIN)/pytest $(PYTEST_ARGS)

# The docker-compose stack built and run with rootful podman (tests/deploy, marker "deploy").
deploy-test: install-dev system-deps deploy-deps
	$(BIN)/pytest -m deploy tests/deploy $(PYTEST_ARGS)

test: lint typecheck unit deploy-test

# Wheels for offline image builds (docker/wheels/, not committed).
wheelhouse: install-dev
	$(BIN)/python -m pip wheel -q -w docker/wheels -c constraints.txt '.[torchserve]' setuptools

clean:
	rm -rf runs screenshots .pytest_cache .mypy_cache .ruff_cache
