"""The integration suite starts its own real stack (separate state folder and ports) with `bastion up`.

If a component cannot start, the whole run fails with the command's message: nothing is skipped quietly.
"""

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bastion.devstack.components.kafka import Kafka
from bastion.devstack.components.keycloak import Keycloak
from bastion.devstack.components.postgres import Postgres
from bastion.devstack.components.redis import Redis
from bastion.devstack.context import StackContext
from bastion.devstack.stack import Stack
from bastion.settings import PROJECT_ROOT, DevstackSettings

# Ports apart from the defaults, so the suite never touches a developer's running dev stack.
TEST_ENV = {
    "BASTION_STATE_DIR": str(PROJECT_ROOT / ".state-test"),
    "BASTION_POSTGRES_PORT": "25432",
    "BASTION_REDIS_PORT": "26379",
    "BASTION_KAFKA_PORT": "29092",
    "BASTION_KAFKA_CONTROLLER_PORT": "29093",
    "BASTION_KEYCLOAK_PORT": "28443",
    "BASTION_KEYCLOAK_MANAGEMENT_PORT": "28444",
    "BASTION_SERVICE_PORT_OFFSET": "10000",
    # Sequence gaps reported after 3 s instead of 30, so the suppressed-event lab runs in seconds.
    "BASTION_SEQUENCE_GAP_ALERT_SECONDS": "3",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Lifecycle tests stop and restart the stack: run them after everything that needs it running."""
    items.sort(key=lambda item: item.get_closest_marker("lifecycle") is not None)
    for item in items:
        item.add_marker(pytest.mark.integration)


def bastion(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run the `bastion` command against the test stack, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "bastion.cli", *args],
        env={**os.environ, **TEST_ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout, check=False,
    )


@pytest.fixture(scope="session")
def settings() -> DevstackSettings:
    overrides = {key.removeprefix("BASTION_").lower(): value for key, value in TEST_ENV.items()}
    return DevstackSettings(**overrides)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def stack(settings: DevstackSettings) -> Iterator[Stack]:
    result = bastion("up")
    if result.returncode != 0:
        pytest.fail(f"the test stack did not start (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")
    yield Stack(settings, progress=lambda message: None)
    bastion("down")


@pytest.fixture(scope="session")
def ctx(stack: Stack) -> StackContext:
    return stack.context()


@pytest.fixture(scope="session")
def kafka(ctx: StackContext) -> Kafka:
    return Kafka(ctx)


@pytest.fixture(scope="session")
def keycloak(ctx: StackContext) -> Keycloak:
    return Keycloak(ctx)


@pytest.fixture(scope="session")
def postgres(ctx: StackContext) -> Postgres:
    return Postgres(ctx)


@pytest.fixture(scope="session")
def redis_server(ctx: StackContext) -> Redis:
    return Redis(ctx)


@pytest.fixture()
def unique() -> str:
    """A fresh suffix, so that each test has its own topics, groups and keys."""
    return uuid.uuid4().hex[:12]


def state_dir() -> Path:
    return Path(TEST_ENV["BASTION_STATE_DIR"])
