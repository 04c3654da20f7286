"""PostgreSQL and Redis refuse anyone without the generated credentials, and keep services apart."""

import ipaddress

import psutil
import psycopg
import pytest
import redis

from bastion.devstack.catalog import load_services
from bastion.devstack.components.postgres import Postgres
from bastion.devstack.components.redis import Redis
from bastion.devstack.context import StackContext
from bastion.devstack.stack import Stack
from bastion.settings import PROJECT_ROOT


@pytest.mark.parametrize("service", [*(entry.name for entry in load_services(PROJECT_ROOT / "infra" / "services.yaml")),
                                     "keycloak"])
def test_each_service_reaches_its_own_database_over_verified_tls(
    postgres: Postgres, ctx: StackContext, service: str
) -> None:
    with psycopg.connect(postgres.conninfo(service, ctx.credentials.postgres[service], dbname=service)) as conn:
        row = conn.execute("SELECT current_user, current_database(), ssl FROM pg_stat_ssl "
                           "WHERE pid = pg_backend_pid()").fetchone()
    assert row == (service, service, True)


def test_postgres_refuses_a_wrong_password(postgres: Postgres) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(postgres.conninfo("accounts", "not-the-password", dbname="accounts"))


def test_postgres_refuses_a_connection_without_password(postgres: Postgres, ctx: StackContext) -> None:
    conninfo = postgres.conninfo("accounts", "", dbname="accounts").replace("password=''", "")
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(conninfo, passfile="/dev/null")


def test_postgres_refuses_plaintext(postgres: Postgres, ctx: StackContext) -> None:
    conninfo = postgres.conninfo("accounts", ctx.credentials.postgres["accounts"], dbname="accounts")
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(conninfo.replace("sslmode=verify-full", "sslmode=disable"))


def test_a_service_cannot_open_another_services_database(postgres: Postgres, ctx: StackContext) -> None:
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        psycopg.connect(postgres.conninfo("accounts", ctx.credentials.postgres["accounts"], dbname="payments"))


def test_redis_refuses_anonymous_and_wrong_password(redis_server: Redis, ctx: StackContext) -> None:
    options = ctx.redis_options("accounts", ctx.credentials.redis["accounts"])
    anonymous = redis.Redis(**{**options, "username": None, "password": None}, socket_timeout=3)
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    with pytest.raises(redis.AuthenticationError):
        redis_server.client("accounts", "not-the-password").ping()
    assert redis_server.client("accounts", ctx.credentials.redis["accounts"]).ping()


def test_redis_speaks_only_tls_with_the_dev_cas_certificate(redis_server: Redis, ctx: StackContext) -> None:
    options = ctx.redis_options("accounts", ctx.credentials.redis["accounts"])
    plaintext = redis.Redis(host=options["host"], port=options["port"], username="accounts",
                            password=ctx.credentials.redis["accounts"], socket_timeout=3)
    with pytest.raises(redis.ConnectionError):
        plaintext.ping()
    system_trust = redis.Redis(**{**options, "ssl_ca_certs": None}, socket_timeout=3)  # not the dev CA
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        system_trust.ping()
    [server] = {conn.pid for conn in psutil.net_connections(kind="tcp")
                if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == ctx.settings.redis_port}
    listening = {conn.laddr.port for conn in psutil.Process(server).net_connections(kind="inet")
                 if conn.status == psutil.CONN_LISTEN}
    assert listening == {ctx.settings.redis_port}, "Redis listens on its TLS port and nowhere else"


def test_redis_confines_a_service_to_its_own_keys(redis_server: Redis, ctx: StackContext, unique: str) -> None:
    client = redis_server.client("payments", ctx.credentials.redis["payments"])
    client.set(f"payments:test:{unique}", "1", ex=60)
    assert client.get(f"payments:test:{unique}") == b"1"
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.get(f"accounts:test:{unique}")
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.flushall()
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.scan()  # would list the key names of every service
    tracker = redis.Redis(**ctx.redis_options("payments", ctx.credentials.redis["payments"]), protocol=3,
                          socket_timeout=5)
    with pytest.raises(redis.exceptions.NoPermissionError):  # RESP3 would push it every key name any user changes
        tracker.execute_command("CLIENT", "TRACKING", "ON", "BCAST")


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def test_every_component_listens_on_loopback_only(stack: Stack) -> None:
    """All listening sockets of every process the devstack runs (children included) are on loopback: the
    datastores, Kafka, Keycloak and every service of infra/services.yaml (gRPC and metrics)."""
    services = [entry.name for entry in load_services(PROJECT_ROOT / "infra" / "services.yaml")]
    pids: set[int] = set()
    for name in ("postgres", "redis", "kafka", "keycloak", *services):
        pid = stack.supervisor.pid(name)
        assert pid is not None, f"{name} is not running"
        pids.add(pid)
        pids.update(child.pid for child in psutil.Process(pid).children(recursive=True))
    listening = [
        conn for conn in psutil.net_connections("tcp") if conn.status == psutil.CONN_LISTEN and conn.pid in pids
    ]
    assert len(listening) >= 6 + 2 * len(services)
    assert [c.laddr for c in listening if not _is_loopback(c.laddr.ip)] == []
