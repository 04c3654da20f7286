"""The `bastion` command's lifecycle against the real stack: status contract, crash recovery, down, up.

These tests stop and restart components, so conftest orders them after every other integration test.
"""

import json
import os
import signal
import socket
import stat
import time
import uuid
from pathlib import Path

import psutil
import psycopg
import pytest
from confluent_kafka.admin import AdminClient

from bastion.devstack.components.kafka import Kafka
from bastion.devstack.components.postgres import Postgres
from bastion.devstack.components.redis import Redis
from bastion.devstack.context import StackContext
from bastion.devstack.event_access import EventAccessPolicy, TopicPolicy
from bastion.devstack.stack import Stack
from tests.integration.conftest import bastion

pytestmark = pytest.mark.lifecycle
INFRA = ("postgres", "redis", "kafka", "keycloak")
SERVICES = ("accounts", "payments", "notifications", "audit")


def status() -> dict[str, object]:
    result = bastion("status", "--json")
    document: dict[str, object] = json.loads(result.stdout)
    return document


def test_status_json_matches_the_contract(ctx: StackContext) -> None:
    result = bastion("status", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert {"state_dir", "pki_dir", "credentials_file", "components"} <= set(doc)
    components = doc["components"]
    assert set(components) == {*INFRA, *SERVICES}
    for name in INFRA:
        assert components[name]["healthy"] is True, name
        assert isinstance(components[name]["pid"], int)
        assert psutil.pid_exists(components[name]["pid"])
    assert components["kafka"]["bootstrap"] == f"localhost:{ctx.settings.kafka_port}"
    assert components["keycloak"]["issuer"] == f"https://localhost:{ctx.settings.keycloak_port}/realms/bastion"
    for name in SERVICES:
        assert components[name]["grpc"].startswith("localhost:")
    built = [name for name in SERVICES if "detail" not in components[name]]
    assert "accounts" in built
    assert all(components[name]["healthy"] is True and isinstance(components[name]["pid"], int) for name in built)
    pki = Path(doc["pki_dir"])
    for name in (*INFRA, *SERVICES, "cli"):
        assert (pki / f"{name}.pem").exists() and (pki / f"{name}-key.pem").exists(), name
    assert (pki / "ca.pem").exists()
    credentials_file = Path(doc["credentials_file"])
    assert stat.S_IMODE(credentials_file.stat().st_mode) == 0o600
    credentials = json.loads(credentials_file.read_text())
    assert set(credentials["users"]) == {"alice", "bob", "tina", "sam", "ada"}
    assert set(credentials["keycloak_clients"]) == set(SERVICES)
    assert set(SERVICES) <= set(credentials["kafka"])


def test_setup_is_idempotent(ctx: StackContext) -> None:
    pki = ctx.layout.pki_dir
    before = {p.name: p.read_bytes() for p in sorted(pki.iterdir())}
    secrets_before = ctx.layout.credentials_file.read_bytes()
    result = bastion("setup")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "certificates issued" not in result.stdout
    assert {p.name: p.read_bytes() for p in sorted(pki.iterdir())} == before
    assert ctx.layout.credentials_file.read_bytes() == secrets_before


def test_up_restores_a_killed_component_without_touching_the_rest(stack: Stack) -> None:
    before = {name: stack.supervisor.pid(name) for name in INFRA}
    redis_pid = before["redis"]
    assert redis_pid is not None
    os.kill(redis_pid, signal.SIGKILL)
    psutil.Process(redis_pid).wait(timeout=10)
    assert status()["components"]["redis"]["healthy"] is False  # type: ignore[index]
    result = bastion("up")
    assert result.returncode == 0, result.stdout + result.stderr
    after = {name: stack.supervisor.pid(name) for name in INFRA}
    assert after["redis"] not in (None, redis_pid)
    assert {n: after[n] for n in ("postgres", "kafka", "keycloak")} == {
        n: before[n] for n in ("postgres", "kafka", "keycloak")
    }


def test_up_restores_keycloak_after_its_launcher_is_killed(stack: Stack) -> None:
    """kc.sh runs Java as its child: killing the launcher must not leave Java holding the ports."""
    before = {name: stack.supervisor.pid(name) for name in INFRA}
    launcher = before["keycloak"]
    assert launcher is not None
    children = psutil.Process(launcher).children(recursive=True)
    os.kill(launcher, signal.SIGKILL)
    psutil.Process(launcher).wait(timeout=10)
    result = bastion("up")
    assert result.returncode == 0, result.stdout + result.stderr
    _, orphans = psutil.wait_procs(children, timeout=10)
    assert orphans == [], "the old Java process was stopped"
    assert stack.supervisor.pid("keycloak") not in (None, launcher)
    assert {n: stack.supervisor.pid(n) for n in ("postgres", "redis", "kafka")} == {
        n: before[n] for n in ("postgres", "redis", "kafka")
    }


def _process_tree(stack: Stack) -> list[psutil.Process]:
    """Every process the devstack runs, children included (short-lived ones may end while we look)."""
    processes = []
    for name in INFRA:
        pid = stack.supervisor.pid(name)
        assert pid is not None
        leader = psutil.Process(pid)
        processes += [leader, *leader.children(recursive=True)]
    return processes


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.NoSuchProcess:
        return ""


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def test_down_leaves_no_process_and_up_keeps_the_data(stack: Stack, ctx: StackContext) -> None:
    marker = uuid.uuid4().hex[:12]
    kafka, postgres, redis_server = Kafka(ctx), Postgres(ctx), Redis(ctx)
    topic = f"it.persist.{marker}.v1"
    kafka.admin().ensure_topics(EventAccessPolicy({topic: TopicPolicy(topic, 1, (), {})}))
    accounts_db = postgres.conninfo("accounts", ctx.credentials.postgres["accounts"], dbname="accounts")
    with psycopg.connect(accounts_db) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS persistence_check (marker text PRIMARY KEY)")
        conn.execute("INSERT INTO persistence_check VALUES (%s)", (marker,))
    redis_server.client("accounts", ctx.credentials.redis["accounts"]).set(f"accounts:persist:{marker}", marker)

    processes = _process_tree(stack)
    assert sum("java" in _name(p) for p in processes) == 2, "Kafka and Keycloak run on the JVM"
    result = bastion("down")
    assert result.returncode == 0, result.stderr
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert alive == [], f"still running after down: {alive}"
    s = ctx.settings
    for port in (s.postgres_port, s.redis_port, s.kafka_port, s.kafka_controller_port, s.keycloak_port,
                 s.keycloak_management_port):
        assert _port_is_free(port), port
    assert all(entry["healthy"] is False for entry in status()["components"].values())  # type: ignore[attr-defined]

    result = bastion("up")
    assert result.returncode == 0, result.stdout + result.stderr
    assert topic in AdminClient(kafka.client_config("admin", ctx.credentials.kafka["admin"])).list_topics(
        timeout=10).topics
    with psycopg.connect(accounts_db) as conn:
        assert conn.execute("SELECT count(*) FROM persistence_check WHERE marker = %s", (marker,)).fetchone() == (1,)
    client = redis_server.client("accounts", ctx.credentials.redis["accounts"])
    assert client.get(f"accounts:persist:{marker}") == marker.encode()


def test_a_port_in_use_stops_up_with_one_clear_message(stack: Stack, ctx: StackContext) -> None:
    assert bastion("down").returncode == 0
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", ctx.settings.redis_port))
        squatter.listen()
        result = bastion("up")
    assert result.returncode == 2
    assert f"port {ctx.settings.redis_port}" in result.stderr and "in use" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert all(stack.supervisor.pid(name) is None for name in INFRA), "nothing may start when a port is taken"


def test_missing_java_stops_up_with_one_clear_message(stack: Stack) -> None:
    result = bastion("up", env={"BASTION_JAVA_HOME": "/nonexistent/jdk", "JAVA_HOME": ""})
    assert result.returncode == 2
    assert "Java is not installed" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert all(stack.supervisor.pid(name) is None for name in INFRA)


def test_up_after_the_failures_brings_everything_back(stack: Stack) -> None:
    started = time.monotonic()
    result = bastion("up")
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(stack.supervisor.pid(name) is not None for name in INFRA)
    assert time.monotonic() - started < 180
