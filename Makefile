# The two commands a newcomer needs: `make demo` and `make test`. Both install what they need first.
.PHONY: setup demo test lint typecheck unit services-up services-down bench

VENV ?= .venv
BIN := $(VENV)/bin

setup:
	@scripts/setup.sh

# The whole system in a closed loop with a live view (local Kafka + Redis unless
# KAFKA_BOOTSTRAP_SERVERS / REDIS_URL name others); DEMO_ARGS passes flags, e.g. --duration 600.
DEMO_ARGS ?=
demo: setup
	$(BIN)/mtlstream demo $(DEMO_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

# Lint, types, then every test against a real Kafka broker and a real Redis started by the tests.
test: lint typecheck
	$(BIN)/pytest

unit: setup
	$(BIN)/pytest tests/unit

services-up: setup
	$(BIN)/mtlstream services up

services-down:
	$(BIN)/mtlstream services down
