# Bastion: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

NPM_STAMP := node_modules/.installed
BUF := node_modules/.bin/buf
# `buf breaking` compares protos/ with the last released contracts, a buf image committed with the code.
RELEASED_PROTOS := protos/released.binpb

.PHONY: setup up down status demo test unit integration lint protos release-protos reset clean bench-devstack bench-events bench-grpc bench-audit bench-audit-service

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.3
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

$(NPM_STAMP): package.json package-lock.json
	npm ci --silent --no-audit --no-fund
	@touch $(NPM_STAMP)

protos: $(STAMP)           ## regenerate Python code and typed stubs from protos/
	scripts/gen_protos.sh

release-protos: $(NPM_STAMP)  ## record protos/ as released: later changes must not break them
	$(BUF) build protos -o $(RELEASED_PROTOS)

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

lint: $(STAMP) $(NPM_STAMP)
	$(BIN)/ruff check bastion services tests benchmarks
	$(BIN)/mypy
	$(BUF) lint protos
	$(BUF) breaking protos --against $(RELEASED_PROTOS)
	@rm -rf .cache/protos-check && scripts/gen_protos.sh .cache/protos-check
	@diff -r -q -x __pycache__ -x '__init__.py' .cache/protos-check/bastion bastion | grep -v '^Only in bastion' \
	  && { echo "generated code is stale: run make protos"; exit 1; } || true

bench-devstack: setup      ## warm start time and resident memory of the whole stack
	$(BIN)/python -m benchmarks.devstack

bench-events: setup        ## sign/verify rates and signed vs unsigned end-to-end throughput
	$(BIN)/python -m benchmarks.signed_events

bench-grpc: setup          ## unary RPC throughput and latency: bare, mTLS only, whole security chain
	$(BIN)/python -m benchmarks.grpc_chain

bench-audit: setup         ## audit log: append, full-chain verification, rebuild (100k records), consuming access decisions
	$(BIN)/python -m benchmarks.audit_chain

bench-audit-service: setup ## the running audit service: CPU per access decision, end to end on the dev stack
	$(BIN)/python -m benchmarks.audit_service

reset: $(STAMP)            ## stop everything and wipe the state folder (secrets, PKI, data)
	$(BIN)/bastion reset --yes

clean: reset
	rm -rf $(VENV)
