"""What each devstack component writes and runs, secure from the first start: TLS 1.3 on every listener and no
plaintext port, loopback only, no anonymous access, secrets in 0600 files or the environment and never on a command
line, data and configuration private to the user, and a failed initialisation reported, never taken as done.

No server runs: the configuration is rendered from a scratch context, and the tools (initdb, kc.sh) are fakes
written to the test's folder.
"""

import json
import os
import re
import stat
import zipfile
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from bastion.devstack.components import keycloak as keycloak_module
from bastion.devstack.components.kafka import BROKER_PRINCIPAL, Kafka
from bastion.devstack.components.keycloak import BUILD_OPTIONS, Keycloak
from bastion.devstack.components.postgres import ADMIN_ROLE, Postgres
from bastion.devstack.components.redis import Redis
from bastion.devstack.components.service import built_services, service_component
from bastion.devstack.context import StackContext
from bastion.devstack.errors import ComponentStartError
from bastion.devstack.event_access import load_policy
from bastion.devstack.pki import ORGANIZATION


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def secrets_of(ctx: StackContext) -> list[str]:
    creds = ctx.credentials
    return [secret for group in (creds.keycloak_clients, creds.keycloak_admin, creds.kafka, creds.postgres,
                                 creds.redis) for secret in group.values()]


def fake_tool(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


# Kafka


def test_kafka_has_a_sasl_ssl_client_listener_and_an_ssl_controller_listener_and_nothing_else(
        stack_context: StackContext) -> None:
    properties = Kafka(stack_context).server_properties()
    s = stack_context.settings
    protocols = dict(item.split(":") for item in properties["listener.security.protocol.map"].split(","))
    assert protocols == {"CLIENT": "SASL_SSL", "CONTROLLER": "SSL"}
    listeners = properties["listeners"].split(",")
    assert listeners == [f"CLIENT://{s.bind_host}:{s.kafka_port}", f"CONTROLLER://{s.bind_host}:{s.kafka_controller_port}"]
    assert properties["advertised.listeners"] == f"CLIENT://{s.public_host}:{s.kafka_port}"
    assert properties["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert properties["ssl.enabled.protocols"] == properties["ssl.protocol"] == "TLSv1.3"
    assert properties["ssl.endpoint.identification.algorithm"] == "https"
    assert properties["listener.name.controller.ssl.client.auth"] == "required"


def test_kafka_authorizes_every_request_and_denies_what_no_acl_grants(stack_context: StackContext) -> None:
    properties = Kafka(stack_context).server_properties()
    assert properties["authorizer.class.name"] == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
    assert properties["allow.everyone.if.no.acl.found"] == "false"
    assert set(properties["super.users"].split(";")) == {"User:admin", f"User:{BROKER_PRINCIPAL}"}
    assert properties["auto.create.topics.enable"] == "false"


def test_only_a_certificate_of_the_dev_organisation_maps_to_a_kafka_principal(stack_context: StackContext) -> None:
    rule = Kafka(stack_context).server_properties()["ssl.principal.mapping.rules"]
    [pattern, replacement] = re.fullmatch(r"RULE:(.*)/(.*)/,DEFAULT", rule).groups()  # type: ignore[union-attr]

    def principal(subject: str) -> str:
        return re.sub(pattern, replacement.replace("$1", r"\1"), subject) if re.match(pattern, subject) else subject

    assert principal(f"CN=kafka,O={ORGANIZATION}") == "kafka"
    assert principal("CN=kafka,O=Another org") == "CN=kafka,O=Another org", "another CA's subject stays unmapped"


def test_kafkas_server_properties_and_keystore_are_private_and_the_storage_is_formatted_once(
        stack_context: StackContext, monkeypatch: pytest.MonkeyPatch) -> None:
    kafka = Kafka(stack_context)
    formatted: list[bool] = []
    monkeypatch.setattr(Kafka, "_format", lambda self: formatted.append(True))
    kafka.prepare()
    assert mode(kafka.conf_dir / "server.properties") == 0o600, "it holds the admin's SCRAM password"
    assert mode(kafka.conf_dir / "keystore.pem") == 0o600, "it holds the broker's private key"
    assert formatted == [True]
    kafka.data_dir.mkdir(parents=True, exist_ok=True)
    (kafka.data_dir / "meta.properties").write_text("cluster.id=x\n")
    kafka.prepare()
    assert formatted == [True], "formatted storage is never formatted again"


def test_kafkas_bootstrap_syncs_the_services_users_and_the_acls_of_the_policy(
        stack_context: StackContext, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, Any] = {}

    class Admin:
        def sync_scram_users(self, users: dict[str, str]) -> None:
            calls["users"] = users

        def ensure_topics(self, policy: Any) -> None:
            calls["topics"] = policy

        def sync_acls(self, grants: Any) -> None:
            calls["acls"] = grants

    monkeypatch.setattr(Kafka, "admin", lambda self: Admin())
    Kafka(stack_context).bootstrap()
    names = set(stack_context.service_names)
    assert calls["users"] == {name: stack_context.credentials.kafka[name] for name in names}
    policy = load_policy(stack_context.settings.infra_dir / "event-access.yaml", names)
    assert calls["acls"] == policy.grants()


def test_an_argument_with_a_carriage_return_cannot_go_in_a_java_argument_file() -> None:
    from bastion.devstack.components.kafka import java_argument_file
    with pytest.raises(ValueError, match="line break"):
        java_argument_file(["one\rtwo"])


# Keycloak


@pytest.fixture()
def java(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    binary = tmp_path / "jdk" / "bin" / "java"
    monkeypatch.setattr(keycloak_module, "find_java", lambda _home: binary)
    return binary


def test_keycloak_serves_https_only_on_loopback_with_tls_1_3_and_gets_its_secrets_from_the_environment(
        stack_context: StackContext, java: Path) -> None:
    spec = Keycloak(stack_context).launch_spec()
    s = stack_context.settings
    assert "--http-enabled=false" in spec.argv
    assert "--https-protocols=TLSv1.3" in spec.argv
    assert f"--http-host={s.bind_host}" in spec.argv
    assert not [argument for argument in spec.argv for secret in secrets_of(stack_context) if secret in argument]
    assert spec.env["KC_DB_PASSWORD"] == stack_context.credentials.postgres["keycloak"]
    assert spec.env["KC_BOOTSTRAP_ADMIN_PASSWORD"] == stack_context.credentials.keycloak_admin["admin"]
    assert "sslmode=verify-full" in spec.env["KC_DB_URL"], "Keycloak checks PostgreSQL's certificate and name"


def test_the_realm_keycloak_imports_with_its_client_secrets_is_private(
        stack_context: StackContext, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Keycloak, "_identities", lambda self: None)
    monkeypatch.setattr(keycloak_module, "render_realm", lambda _identities, _creds: {"realm": "bastion", "s": "x"})
    keycloak = Keycloak(stack_context)
    keycloak.prepare()
    import_dir = keycloak.home / "data" / "import"
    assert mode(import_dir) == 0o700
    assert mode(import_dir / "realm-bastion.json") == 0o600
    assert json.loads((import_dir / "realm-bastion.json").read_text()) == {"realm": "bastion", "s": "x"}


def keycloak_archive(ctx: StackContext, exit_code: str, calls: Path) -> Path:
    """The distribution's zip, its kc.sh noting each call in CALLS and exiting with EXIT_CODE."""
    version = ctx.distributions["keycloak"].version
    archive = ctx.distribution_dir("keycloak") / f"keycloak-quarkus-dist-{version}.zip"
    archive.parent.mkdir(parents=True, exist_ok=True)
    kc = f'#!/bin/sh\necho "$@" >> {calls}\nexit {exit_code}\n'
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr(f"keycloak-{version}/bin/kc.sh", kc)
    return archive


def test_a_failed_keycloak_build_is_reported_and_not_taken_as_built(stack_context: StackContext, java: Path,
                                                                    tmp_path: Path) -> None:
    keycloak, calls, build = Keycloak(stack_context), tmp_path / "kc-calls", f"build {' '.join(BUILD_OPTIONS)}\n"
    keycloak_archive(stack_context, "3", calls)
    with pytest.raises(ComponentStartError, match=r"`kc\.sh build` failed"):
        keycloak.install(lambda _message: None)
    assert not (keycloak.home / ".bastion-build").exists()
    keycloak_archive(stack_context, "0", calls)
    keycloak.install(lambda _message: None)
    assert calls.read_text() == build * 2, "built again after the failure"
    keycloak.install(lambda _message: None)
    assert calls.read_text() == build * 2, "and not again once built"


# PostgreSQL


@pytest.fixture()
def postgres(stack_context: StackContext, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Postgres:
    """PostgreSQL with a fake initdb that notes its arguments and its password file's mode and text."""
    bin_dir = tmp_path / "pgbin"
    fake_tool(bin_dir / "postgres", "exit 0\n")
    fake_tool(bin_dir / "initdb", f'echo "$@" > {tmp_path}/initdb.args\n'
                                  'for a; do case "$a" in --pwfile=*) f="${a#--pwfile=}";; esac; done\n'
                                  f'stat -c %a "$f" > {tmp_path}/initdb.pwmode\ncat "$f" > {tmp_path}/initdb.pw\n'
                                  'exit ${FAKE_INITDB_EXIT:-0}\n')
    settings = stack_context.settings.model_copy(update={"postgres_bin_dir": bin_dir})
    monkeypatch.setattr(Postgres, "_run_as", lambda self: None)  # never useradd here, even as root
    return Postgres(StackContext(settings=settings, layout=stack_context.layout, credentials=stack_context.credentials,
                                 pki=stack_context.pki, services=stack_context.services, distributions={}))


def test_postgres_listens_on_loopback_with_tls_1_3_and_no_unix_socket(postgres: Postgres) -> None:
    argv = postgres.launch_spec().argv
    options = dict(argv[i + 1].split("=", 1) for i, word in enumerate(argv) if word == "-c")
    assert options["listen_addresses"] == postgres.ctx.settings.bind_host
    assert options["ssl"] == "on"
    assert options["ssl_min_protocol_version"] == "TLSv1.3"
    assert options["unix_socket_directories"] == ""
    assert options["password_encryption"] == "scram-sha-256"


def test_postgres_admits_only_tls_connections_with_a_scram_password(postgres: Postgres) -> None:
    (postgres.data_dir).mkdir(parents=True)
    (postgres.data_dir / "PG_VERSION").write_text("16\n")
    (postgres.data_dir / "pg_hba.conf").write_text("local all all trust\nhost all all 0.0.0.0/0 trust\n")
    postgres.prepare()
    rules = [line.split() for line in (postgres.data_dir / "pg_hba.conf").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules and all(rule[0] == "hostssl" and rule[-1] == "scram-sha-256" for rule in rules), rules


def test_postgres_certificate_files_are_private_and_existing_data_is_never_initialised_again(
        postgres: Postgres, tmp_path: Path) -> None:
    postgres.data_dir.mkdir(parents=True)
    (postgres.data_dir / "PG_VERSION").write_text("16\n")
    (postgres.data_dir / "base").write_text("the data")
    postgres.prepare()
    assert not (tmp_path / "initdb.args").exists()
    assert (postgres.data_dir / "base").read_text() == "the data"
    for name in ("server.crt", "server.key", "ca.crt"):
        assert mode(postgres.data_dir / name) == 0o600, name


def test_initdb_gets_the_admin_password_from_a_private_file_and_scram_authentication(
        postgres: Postgres, tmp_path: Path) -> None:
    postgres.prepare()
    arguments = (tmp_path / "initdb.args").read_text()
    password = postgres.ctx.credentials.postgres[ADMIN_ROLE]
    assert password not in arguments
    assert "--auth=scram-sha-256" in arguments.split()
    assert (tmp_path / "initdb.pwmode").read_text().strip() == "600"
    assert (tmp_path / "initdb.pw").read_text() == password + "\n"
    assert mode(postgres.data_dir) == 0o700


def test_the_admin_password_file_is_never_readable_by_others_not_even_before_it_is_chmod_ed(
        postgres: Postgres, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its folder is traversable (0711, for the postgres user) under the shared temporary folder: a local user who
    # opens the file while it is still 0644 keeps the descriptor and reads the superuser's password once written.
    real_chmod = os.chmod
    modes_before_chmod: list[int] = []

    def noting_chmod(path: Any, new_mode: int, *args: Any, **kwargs: Any) -> None:
        if Path(path).name == "pw":
            modes_before_chmod.append(stat.S_IMODE(os.stat(path).st_mode))
        real_chmod(path, new_mode, *args, **kwargs)

    monkeypatch.setattr(os, "chmod", noting_chmod)
    previous = os.umask(0o022)
    try:
        postgres.prepare()
    finally:
        os.umask(previous)
    assert modes_before_chmod and all(m & 0o077 == 0 for m in modes_before_chmod), [oct(m) for m in modes_before_chmod]


def test_a_failing_initdb_stops_the_start(postgres: Postgres, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_INITDB_EXIT", "1")
    with pytest.raises(ComponentStartError, match="initdb failed"):
        postgres.prepare()


class FakeConnection:
    """Notes each statement as SQL text; no role or database exists yet."""

    def __init__(self) -> None:
        self.statements: list[str] = []

    def __enter__(self) -> "FakeConnection":
        return self

    def __exit__(self, *_exc: object) -> None:
        pass

    def execute(self, query: Any, _params: Any = None) -> "FakeConnection":
        self.statements.append(query.as_string(None) if isinstance(query, sql.Composable) else query)
        return self

    def fetchone(self) -> None:
        return None


def test_each_service_role_is_unprivileged_and_its_database_closed_to_public(
        postgres: Postgres, monkeypatch: pytest.MonkeyPatch) -> None:
    conn = FakeConnection()
    installed: list[str] = []
    monkeypatch.setattr(Postgres, "admin", lambda self: conn)
    monkeypatch.setattr(Postgres, "_install_append_only_log", lambda self, name: installed.append(name))
    postgres.bootstrap()
    for name in postgres.databases:
        [create] = [s for s in conn.statements if s.startswith(f'CREATE ROLE "{name}" ')]
        assert " LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD " in create
        assert f'REVOKE ALL ON DATABASE "{name}" FROM PUBLIC' in conn.statements
        owner = ADMIN_ROLE if name == "audit" else name
        assert f'ALTER DATABASE "{name}" OWNER TO "{owner}"' in conn.statements
    assert installed == ["audit"], "the audit log's database belongs to the admin, who installs the log"


# Redis


def test_redis_listens_with_tls_1_3_only_on_loopback_and_reads_its_acl_file(stack_context: StackContext) -> None:
    redis = Redis(stack_context)
    redis.prepare()
    config = (redis.conf_dir / "redis.conf").read_text().splitlines()
    s = stack_context.settings
    assert "port 0" in config, "no plaintext listener"
    assert f"tls-port {s.redis_port}" in config
    assert f"bind {s.bind_host}" in config
    assert 'tls-protocols "TLSv1.3"' in config
    assert "protected-mode yes" in config
    [aclfile] = [line.split(" ", 1)[1] for line in config if line.startswith("aclfile ")]
    assert Path(aclfile) == redis.conf_dir / "users.acl" and Path(aclfile).read_text().startswith("user default off")
    assert mode(redis.conf_dir / "users.acl") == 0o600, "it holds every Redis password"
    assert mode(redis.conf_dir / "redis.conf") == 0o600
    assert mode(stack_context.layout.component_data("redis")) == 0o700


# Services


def test_a_service_gets_the_installs_settings_and_no_unset_one_as_the_text_none(stack_context: StackContext) -> None:
    spec = service_component("accounts")(stack_context).launch_spec()
    assert spec.env["BASTION_STATE_DIR"] == str(stack_context.settings.state_dir)
    assert "BASTION_JAVA_HOME" not in spec.env and "None" not in spec.env.values()


def test_only_services_with_a_server_module_are_run() -> None:
    assert built_services(["accounts", "no_such_service"]) == ["accounts"]
