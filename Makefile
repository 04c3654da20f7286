# Bastion: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup up down status demo test unit integration lint reset clean bench-devstack

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.3
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)            ## venv, pinned Kafka + Keycloak, dev PKI, generated secrets (idempotent)
	$(BIN)/bastion setup

up: setup                  ## start and health-check the whole stack
	$(BIN)/bastion up

down: $(STAMP)             ## stop everything, keep the data
	$(BIN)/bastion down

status: $(STAMP)
	$(BIN)/bastion status

demo: setup                ## run the platform and its scenario
	$(BIN)/bastion demo

unit: $(STAMP)
	$(BIN)/pytest tests/unit

integration: $(STAMP)      ## starts its own stack (state folder .state-test, ports 2xxxx)
	$(BIN)/pytest tests/integration

test: lint unit integration

lint: $(STAMP)
	$(BIN)/ruff check bastion tests
	$(BIN)/mypy

bench-devstack: setup      ## warm start time and resident memory of the whole stack
	$(BIN)/python -m benchmarks.devstack

reset: $(STAMP)            ## stop everything and wipe the state folder (secrets, PKI, data)
	$(BIN)/bastion reset --yes

clean: reset
	rm -rf $(VENV)
