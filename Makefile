# Bastion: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

NPM_STAMP := node_modules/.installed
BUF := node_modules/.bin/buf
# `buf breaking` compares protos/ with the last released contracts, a buf image committed with the code.
RELEASED_PROTOS := protos/released.binpb

.PHONY: lock setup up down status demo test unit integration lint protos release-protos reset clean bench-devstack bench-events bench-grpc bench-audit bench-audit-service bench-revocation

# Python packages come only from requirements.lock, every file checked against its SHA-256 (docs/dependencies.md).
LOCK := requirements.lock

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	scripts/install_locked_deps.sh $(VENV) $(LOCK) .
	@touch $(STAMP)

# After changing a pin in pyproject.toml; the versions already locked are kept where they still fit.
# Move one package on: `make lock LOCK_ARGS='--upgrade-package NAME'`; everything: `LOCK_ARGS=--upgrade`.
lock: $(STAMP)             ## re-resolve requirements.lock (every package, with hashes) from pyproject.toml
	$(BIN)/uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 --generate-hashes \
	  --quiet --custom-compile-command 'make lock' -o $(LOCK) $(LOCK_ARGS)

$(NPM_STAMP): package.json package-lock.json
	scripts/install_locked_node_tools.sh
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

bench-revocation: setup    ## token revocation: seconds from a sign-out or a role taken away until a service refuses
	$(BIN)/python -m benchmarks.revocation

reset: $(STAMP)            ## stop everything and wipe the state folder (secrets, PKI, data)
	$(BIN)/bastion reset --yes

clean: reset
	rm -rf $(VENV)
