"""Faults found by the second fail-open review (edge, events, backup, access), fixed: each test failed before its
fix. A lab that held on a refusal by another control than the one its `expect` names could not tell whether its
own control fired; now it stops as not run (LabSetupError), or does not hold."""

import types
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
import redis
from pyrage import x25519

from bastion.labs import access, backup, edge, events
from bastion.labs.base import Outcome
from tests.unit.labs.fakes import RpcError
from tests.unit.labs.test_fail_open_faults import outcome_of
from tests.unit.labs.test_lab_probes import hostile, replaying, validating


def test_a_thiefs_archive_refused_for_another_reason_than_its_digest_is_not_the_manifest_holding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`_slip_in_own_database` holds on any BackupError. With the digest check gone, `verify` still refuses the
    thief's archive ("PGDMP" and zeros) when it decrypts it and finds no pg_dump archive: a thief who encrypts a
    real dump of their own would be restored, yet the lab reports the manifest holding (expect: does not match its
    digest)."""
    identity = x25519.Identity.generate()
    (tmp_path / "recipient").write_text(str(identity.to_public()))
    genuine = tmp_path / "backup"
    genuine.mkdir()
    (genuine / "notifications.sql.age").write_bytes(b"the genuine archive")
    monkeypatch.setattr(backup.backups, "backup_keys", lambda ctx: types.SimpleNamespace(
        recipient_file=tmp_path / "recipient"))

    def no_dump(ctx: Any, folder: Path) -> None:
        raise backup.backups.BackupError(f"{folder.name}: notifications.sql.age decrypts to 4,123 bytes that are no "
                                         "pg_dump archive", "restore another backup")

    monkeypatch.setattr(backup.backups, "verify", no_dump)
    probe = backup._slip_in_own_database(types.SimpleNamespace(ctx=None), genuine,  # type: ignore[arg-type]
                                         genuine / "notifications.sql.age")
    assert outcome_of(probe) is not Outcome.HELD


def test_an_oversized_request_refused_by_the_rate_limiter_is_not_the_message_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """hostile-input holds the 2 MiB request on any RESOURCE_EXHAUSTED, the rate limiter's too: a server without
    the 1 MiB cap whose limiter refuses alice (her window spent by earlier labs) passes the step, and the lab."""

    def no_cap_but_limited(request: bytes) -> Any:
        if len(request) > edge.MAX_MESSAGE_BYTES:
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limit of 600 calls per 60s exceeded")
        return validating(request)

    assert outcome_of(edge.hostile_input(hostile(monkeypatch, no_cap_but_limited))) is not Outcome.HELD


def test_a_replay_dropped_by_the_sequence_check_is_not_the_inbox_holding(monkeypatch: pytest.MonkeyPatch) -> None:
    """replayed-event holds on any `event_dropped` line of the event. With the inbox's event-id check gone, the
    replay is still dropped, as reason=replay (its sequence is not newer than the last applied): the lab reports the
    inbox holding (expect: reason=duplicate) though it never recognised the event."""
    session = replaying(monkeypatch, [1, 1], ['notifications: event_dropped {"reason": "replay", "event_id": "ev-1"}'])
    assert outcome_of(events.replayed_event(session)) is not Outcome.HELD


class FakeRedis:
    """Redis as the lab meets it: the default user refused, payments confined to its prefix, plaintext closed."""

    def __init__(self, username: str | None = None, ssl: bool = False, **options: Any) -> None:
        self.username, self.ssl = username, ssl

    def ping(self) -> bool:
        if self.username is None:
            raise redis.AuthenticationError("WRONGPASS invalid username-password pair or user is disabled.")
        if not self.ssl:
            raise redis.ConnectionError("Connection closed by server.")
        return True

    def get(self, key: str) -> None:
        raise redis.exceptions.NoPermissionError("No permissions to access a key")

    def flushall(self) -> None:
        raise redis.exceptions.NoPermissionError("this user has no permissions to run the 'flushall' command")

    def close(self) -> None:
        pass


@pytest.mark.parametrize("outage", [
    "connection failed: FATAL:  sorry, too many clients already",
    "connection failed: timeout expired",
], ids=["too-many-clients", "timeout"])
def test_a_database_that_could_not_take_the_connection_is_not_the_database_refusing_the_role(
    outage: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    """datastore-access holds each PostgreSQL attempt on any OperationalError. A server out of connection slots, or
    too slow to answer within the lab's three seconds, refuses nobody for the reason the lab names (pg_hba.conf, the
    database's CONNECT grant, SCRAM): the lab reports three defences it never saw."""

    class Connection:
        def __init__(self, conninfo: str) -> None:
            params = psycopg.conninfo.conninfo_to_dict(conninfo)
            if params["dbname"] != "accounts" or params["sslmode"] != "verify-full" or not params.get("password"):
                raise psycopg.OperationalError(outage)

        def __enter__(self) -> "Connection":
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def execute(self, query: str) -> None:
            pass

    monkeypatch.setattr(access.redis, "Redis", FakeRedis)
    monkeypatch.setattr(access.psycopg, "connect", Connection)
    settings = types.SimpleNamespace(public_host="localhost", postgres_port=5432, redis_port=6379)
    ctx = types.SimpleNamespace(
        settings=settings, ca_file=tmp_path / "ca.pem",
        credentials=types.SimpleNamespace(redis={"payments": "pw"}, postgres={"accounts": "pw"}),
        redis_options=lambda user, password: {"host": "localhost", "port": 6379, "username": user,
                                              "password": password, "ssl": True})
    said = outcome_of(access.datastore_access(types.SimpleNamespace(ctx=ctx)))  # type: ignore[arg-type]
    assert said is not Outcome.HELD
