"""The checks each lab turns an observation into evidence with, fed what a running stack would answer: the
expected refusal is the defence firing; an answer, another refusal, or nothing at all is not."""

import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pyrage
import pytest
from confluent_kafka import KafkaError
from pyrage import x25519
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from bastion.devstack.errors import PrerequisiteError
from bastion.labs import access, audit, backup, detection, edge, events, money, supply, tokens, transport
from bastion.labs.base import Evidence, LabResult, Outcome
from bastion.labs.logs import untouched_since
from bastion.labs.personal import in_clear_or_sealed
from bastion.labs.platform import Answer, AuditEntry, Delivery, EventRoute, LabSetupError
from tests.unit.labs.fakes import RpcError, lab

OK = grpc.StatusCode.OK
UNAUTHENTICATED, UNAVAILABLE = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE
DENIED, NOT_FOUND = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND


def outcome_of(evidence: list[Evidence]) -> Outcome:
    return LabResult(lab(), tuple(evidence), 0.0).outcome


# --- gRPC answers ---


def test_a_forged_token_holds_only_when_refused_with_the_expected_code() -> None:
    accepted = tokens._refusal("alg none", Answer(OK), "UNAUTHENTICATED", "alice lists 3 accounts")
    assert (accepted.held, accepted.observed) == (False, "OK: alice lists 3 accounts")
    other = tokens._refusal("alg none", Answer(DENIED, "policy"), "UNAUTHENTICATED", "x")
    assert other.held is False and other.observed == "PERMISSION_DENIED: policy (expected UNAUTHENTICATED)"
    outage = tokens._refusal("alg none", Answer(UNAVAILABLE, "down"), "UNAUTHENTICATED", "x")
    assert outage.held is False
    refused = tokens._refusal("alg none", Answer(UNAUTHENTICATED, "bad_algorithm"), "UNAUTHENTICATED", "x")
    assert (refused.held, refused.observed) == (True, "UNAUTHENTICATED: bad_algorithm")


def test_a_foreign_audience_holds_only_when_the_audience_check_is_what_refused_it() -> None:
    audience = tokens._refusal("payments' token at notifications",
                               Answer(UNAUTHENTICATED, "invalid token: wrong_audience: Audience doesn't match"),
                               "UNAUTHENTICATED", "x", reason=tokens.WRONG_AUDIENCE)
    assert audience.held is True
    another = tokens._refusal("payments' token at notifications",
                              Answer(UNAUTHENTICATED, "invalid token: expired: Signature has expired"),
                              "UNAUTHENTICATED", "x", reason=tokens.WRONG_AUDIENCE)
    assert another.held is False and "expected the reason wrong_audience" in another.observed


def test_an_access_attempt_holds_only_on_one_of_its_refusal_codes() -> None:
    assert access._expect("bob reads", Answer(OK), {NOT_FOUND}, "bob read it").held is False
    assert access._expect("bob reads", Answer(OK), {NOT_FOUND}, "bob read it").observed == "OK: bob read it"
    assert access._expect("bob reads", Answer(NOT_FOUND, "no account"), {NOT_FOUND}, "").held is True
    assert access._expect("bob reads", Answer(UNAVAILABLE, "down"), {NOT_FOUND}, "").held is False
    assert access._expect("as notifications", Answer(UNAUTHENTICATED), {DENIED, UNAUTHENTICATED}, "").held is True


def test_a_call_without_a_client_certificate_holds_only_when_the_handshake_fails() -> None:
    assert transport._unavailable("no cert", Answer(OK)).held is False
    assert transport._unavailable("no cert", Answer(UNAVAILABLE, "handshake failed")).held is True
    assert transport._unavailable("no cert", Answer(UNAUTHENTICATED, "got past TLS")).held is False


def test_a_data_store_attempt_holds_only_when_it_raises_one_of_the_refusals() -> None:
    def refused() -> None:
        raise PermissionError("NOPERM this user has no permissions\nsecond line")

    def crashed() -> None:
        raise KeyError("not a refusal")

    said = access._refused("FLUSHALL", refused, (PermissionError,))
    assert (said.held, said.observed) == (True, "refused: PermissionError: NOPERM this user has no permissions")
    assert access._refused("FLUSHALL", lambda: None, (PermissionError,)).held is False
    with pytest.raises(KeyError):
        access._refused("FLUSHALL", crashed, (PermissionError,))


# --- the audit log's grants and trigger ---


@pytest.fixture()
def guarded_table() -> Iterator[Any]:
    """A table whose UPDATE a trigger refuses, as the audit log's does."""
    engine = create_engine("sqlite://")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE log (seq INTEGER PRIMARY KEY, reason TEXT)")
        conn.exec_driver_sql("INSERT INTO log VALUES (1, 'genuine')")
        conn.exec_driver_sql("CREATE TRIGGER append_only BEFORE UPDATE ON log BEGIN "
                             "SELECT RAISE(ABORT, 'the audit log is append-only'); END")
    yield engine
    engine.dispose()


class DatabaseError(Exception):
    """What psycopg raises: the server's message, and its SQLSTATE."""

    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class FailingEngine:
    """An engine whose every statement fails with ERROR, wrapped as SQLAlchemy wraps a driver's error."""

    def __init__(self, error: DatabaseError) -> None:
        self.error = error

    def connect(self) -> "FailingEngine":
        return self

    def __enter__(self) -> "FailingEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def begin(self) -> Any:
        return types.SimpleNamespace(rollback=lambda: None)

    def execute(self, statement: Any) -> None:
        raise DBAPIError(str(statement), {}, self.error)


def test_a_statement_on_the_audit_log_holds_when_refused_and_not_when_it_executes(guarded_table: Any) -> None:
    refusing = FailingEngine(DatabaseError("the audit log is append-only: UPDATE refused", "42501"))
    refused = audit._rolled_back(refusing, "UPDATE", text("UPDATE log SET reason = 'x' WHERE seq = 1"))  # type: ignore[arg-type]
    assert refused.held is True
    assert refused.observed == "refused: the audit log is append-only: UPDATE refused (SQLSTATE 42501)"
    executed = audit._rolled_back(guarded_table, "INSERT", text("INSERT INTO log VALUES (2, 'x')"))
    assert (executed.held, executed.observed) == (False, "executed (the lab rolled it back): nothing stopped it")
    with guarded_table.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM log").scalar_one() == 1, "rolled back"


# --- downloads and backups ---


def fetching(monkeypatch: pytest.MonkeyPatch, refusal: str | None) -> None:
    def fetch(dist: Any, cache: Path) -> Path:
        if refusal is not None:
            raise PrerequisiteError(refusal, "fetch again")
        return cache

    monkeypatch.setattr(supply.distributions, "fetch", fetch)


def test_a_tampered_download_holds_when_refused_and_a_refused_calibration_stops_the_lab(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    fetching(monkeypatch, None)
    assert supply._outcome("tampered", None, tmp_path, expect_refusal=True).held is False  # type: ignore[arg-type]
    calibration = supply._outcome("untouched", None, tmp_path, expect_refusal=False)  # type: ignore[arg-type]
    assert calibration.held is None and calibration.observed == "verified: every file matches its pin"
    fetching(monkeypatch, "kafka-clients-3.9.jar is pinned to sha256 aa, found bb")
    refused = supply._outcome("tampered", None, tmp_path, expect_refusal=True)  # type: ignore[arg-type]
    assert refused.held is True and "is pinned" in refused.observed
    with pytest.raises(LabSetupError, match="the untouched copy was refused"):
        supply._outcome("untouched", None, tmp_path, expect_refusal=False)  # type: ignore[arg-type]
    # Held only when the refusal names the file tampered with and the pin check; another refusal is not the control.
    named = supply._outcome("tampered", None, tmp_path, expect_refusal=True,  # type: ignore[arg-type]
                            names=("kafka-clients-3.9.jar", "is pinned"))
    assert named.held is True
    fetching(monkeypatch, "Maven could not fetch kafka 4.1.1 from Maven Central: connection refused")
    other = supply._outcome("tampered", None, tmp_path, expect_refusal=True,  # type: ignore[arg-type]
                            names=("kafka-clients-3.9.jar", "is pinned"))
    assert other.held is False and "another check refused it" in other.observed


def test_a_stolen_archive_holds_only_as_an_age_file_with_nothing_in_clear(tmp_path: Path) -> None:
    identity = x25519.Identity.generate()
    sealed = tmp_path / "notifications.sql.age"
    sealed.write_bytes(pyrage.encrypt(b"PGDMP CREATE TABLE notifications alice", [identity.to_public()]))
    [read] = backup._read(sealed)
    assert read.held is True and "nothing: no dump header" in read.observed
    clear = tmp_path / "clear.sql.age"
    clear.write_bytes(backup.AGE_HEADER + b"PGDMP ... CREATE TABLE notifications")
    [read] = backup._read(clear)
    assert read.held is False and "'PGDMP', 'CREATE TABLE', 'notifications'" in read.observed
    plain = tmp_path / "plain.sql.age"
    plain.write_bytes(b"just some bytes")
    assert next(backup._read(plain)).held is False, "not an age file at all"
    [decrypted] = backup._decrypt_with_own_identity(sealed)
    assert decrypted.held is True and decrypted.observed.startswith("refused")


def test_an_archive_anyone_can_decrypt_is_the_attack_getting_through(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backup.pyrage, "decrypt", lambda data, identities: b"PGDMP")
    archive = tmp_path / "notifications.sql.age"
    archive.write_bytes(b"whatever")
    [decrypted] = backup._decrypt_with_own_identity(archive)
    assert (decrypted.held, decrypted.observed) == (False, "decrypted")


def test_a_thiefs_archive_holds_only_when_the_manifest_refuses_it(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    identity = x25519.Identity.generate()
    (tmp_path / "recipient").write_text(str(identity.to_public()))
    genuine = tmp_path / "backup"
    genuine.mkdir()
    (genuine / "notifications.sql.age").write_bytes(b"the genuine archive")
    monkeypatch.setattr(backup.backups, "backup_keys", lambda ctx: types.SimpleNamespace(
        recipient_file=tmp_path / "recipient"))
    session: Any = types.SimpleNamespace(ctx=None)

    def refuse(ctx: Any, folder: Path) -> None:
        raise backup.backups.BackupError("notifications.sql.age does not match its digest", "restore another")

    monkeypatch.setattr(backup.backups, "verify", refuse)
    [refused] = backup._slip_in_own_database(session, genuine, genuine / "notifications.sql.age")
    assert refused.held is True and "does not match its digest" in refused.observed
    assert (genuine / "notifications.sql.age").read_bytes() == b"the genuine archive", "put back"
    monkeypatch.setattr(backup.backups, "verify", lambda ctx, folder: None)
    [believed] = backup._slip_in_own_database(session, genuine, genuine / "notifications.sql.age")
    assert believed.held is False and "would restore the thief's data" in believed.observed
    assert (genuine / "notifications.sql.age").read_bytes() == b"the genuine archive", "put back"


# --- events ---


class FakeWatch:
    def log_lines(self, *args: Any, **kwargs: Any) -> list[str]:
        return []

    def audit_entries(self, *args: Any, **kwargs: Any) -> list[AuditEntry]:
        return [AuditEntry(7, "rejection", None, None, None, "bad_signature")]


def event_session(delivery: Delivery, consumers: tuple[str, ...] = ("audit", "notifications")) -> Any:
    return types.SimpleNamespace(
        target=types.SimpleNamespace(event_routes={events.ACCOUNTS_TOPIC: EventRoute("t.v1", consumers)},
                                     verdict_wait_seconds=0.0),
        watch=FakeWatch, publish=lambda principal, topic, record, **kwargs: delivery)


def dead_letters(monkeypatch: pytest.MonkeyPatch, found: dict[str, dict[str, str]]) -> None:
    class FakeDeadLetters:
        topic = "t.v1.dlq"

        def __init__(self, session: Any, topic: str) -> None:
            pass

        def verdicts(self, source: str, consumers: tuple[str, ...], wait: float) -> dict[str, dict[str, str]]:
            assert source == "t.v1/0/5"
            return found

        def close(self) -> None:
            pass

    monkeypatch.setattr(events, "DeadLetters", FakeDeadLetters)


def verdict(reason: str) -> dict[str, str]:
    return {"bastion-reject-reason": reason, "bastion-reject-detail": "detail"}


def test_an_injected_event_holds_only_when_every_consumer_dead_letters_it_for_the_expected_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    session = event_session(Delivery(None, "t.v1/0/5"))
    dead_letters(monkeypatch, {"audit": verdict("bad_signature"), "notifications": verdict("bad_signature")})
    said = list(events.inject(session, events.ACCOUNTS_TOPIC, "accounts", b"x", "bad_signature", "cid"))
    assert [item.held for item in said] == [None, True, True, None]
    assert outcome_of(said) is Outcome.HELD
    dead_letters(monkeypatch, {"audit": verdict("bad_signature"), "notifications": verdict("unknown_key")})
    said = list(events.inject(session, events.ACCOUNTS_TOPIC, "accounts", b"x", "bad_signature", "cid"))
    assert [item.held for item in said] == [None, True, False, None]
    dead_letters(monkeypatch, {"audit": verdict("bad_signature")})
    said = list(events.inject(session, events.ACCOUNTS_TOPIC, "accounts", b"x", "bad_signature", "cid"))
    assert [item.held for item in said][:3] == [None, True, False]
    assert said[2].observed == "no dead letter within 0s: the event was not refused"


def test_an_event_the_broker_refused_to_take_stops_the_lab(monkeypatch: pytest.MonkeyPatch) -> None:
    dead_letters(monkeypatch, {})
    session = event_session(Delivery(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "no acl")))
    with pytest.raises(LabSetupError, match=r"accounts could not write to t\.v1: no acl"):
        list(events.inject(session, events.ACCOUNTS_TOPIC, "accounts", b"x", "bad_signature", "cid"))


def acl_session(delivery: Delivery) -> Any:
    return types.SimpleNamespace(
        kafka_config=lambda principal: {}, publish=lambda principal, topic, record: delivery,
        target=types.SimpleNamespace(event_routes={events.PAYMENTS_TOPIC: EventRoute("payments.events.v1", ())}))


@pytest.mark.parametrize(("delivery", "held"), [
    (Delivery(None, "payments.events.v1/0/9"), False),
    (Delivery(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "denied")), True),
    (Delivery(KafkaError(KafkaError._MSG_TIMED_OUT)), False),
], ids=["accepted", "acl", "timed-out"])
def test_writing_without_an_acl_holds_only_on_topic_authorization_failed(
    delivery: Delivery, held: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(events, "AdminClient", lambda config: types.SimpleNamespace(
        list_topics=lambda timeout: types.SimpleNamespace(topics={"a": 1})))
    said = list(events.topic_without_acl(acl_session(delivery)))
    assert [item.held for item in said] == [None, held]


# --- logs and personal data ---


def test_a_log_holds_without_the_marker_or_a_raw_control_character() -> None:
    marker = "forged0123456789ab"
    assert untouched_since("audit", '{"event":"event_rejected","claimed":"(malformed)"}\n', marker).held is True
    assert untouched_since("audit", f'{{"note":"{marker}"}}\n', marker).held is False
    assert untouched_since("audit", '{"x":"\x1b[2J"}\n', marker).held is False
    assert untouched_since("audit", '{"x":"\u202e"}\n', marker).held is False


@pytest.mark.parametrize("override", list("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"))
def test_a_log_holding_any_raw_direction_override_or_isolate_does_not_hold(override: str) -> None:
    said = untouched_since("notifications", f'{{"event":"event_rejected","claimed":"a{override}b"}}\n', "marker")
    assert said.held is False and f"U+{ord(override):04X}" in said.observed


def test_an_address_in_clear_in_any_common_form_is_the_attack_getting_through() -> None:
    secret = b"bob.0123456789@example.com"
    assert in_clear_or_sealed("topic", b"\x0a\x20" + bytes(range(64)), secret, "sealed").held is True
    for leaked in (secret, secret.upper(), secret.hex().encode(), secret.decode().encode("utf-16-le")):
        assert in_clear_or_sealed("topic", b"..." + leaked + b"...", secret, "sealed").held is False


# --- transport ---


class FakeSocket:
    def __init__(self, reply: bytes | BaseException) -> None:
        self.reply = reply

    def __enter__(self) -> "FakeSocket":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        pass

    def recv(self, size: int) -> bytes:
        if isinstance(self.reply, BaseException):
            raise self.reply
        return self.reply


def plaintext_session() -> Any:
    settings = types.SimpleNamespace(bind_host="127.0.0.1", kafka_port=1, kafka_controller_port=2,
                                     public_host="localhost")
    return types.SimpleNamespace(ctx=types.SimpleNamespace(settings=settings, ca_file="ca.pem"))


@pytest.mark.parametrize(("reply", "held"), [
    (b"\x00\x00\x00\x10kafka-answer", False),
    (bytes([transport.TLS_ALERT, 3, 3]), True),
    (b"", True),
    (ConnectionResetError(), True),
], ids=["kafka-answers", "tls-alert", "closed", "reset"])
def test_a_request_in_the_clear_holds_unless_kafka_answers_it(
    reply: bytes | BaseException, held: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(transport, "_client_listener_answers", lambda session: 3)
    monkeypatch.setattr(transport.socket, "create_connection", lambda address, timeout: FakeSocket(reply))
    monkeypatch.setattr(transport, "_controller_verdict", lambda session: ("refused", True))
    said = list(transport.plaintext_broker(plaintext_session()))
    assert [item.held for item in said] == [None, held, True]


class FakeContext:
    def __init__(self, on_read: bytes | BaseException) -> None:
        self.on_read = on_read

    def wrap_socket(self, raw: Any, server_hostname: str) -> FakeSocket:
        return FakeSocket(self.on_read)


@pytest.mark.parametrize(("on_read", "held"), [
    (TimeoutError(), False),
    (b"", False),
    (transport.ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] certificate required"), True),
    (ConnectionResetError(), True),
], ids=["waits", "stays-open", "alert", "reset"])
def test_the_controller_holds_only_when_it_refuses_a_client_without_a_certificate(
    on_read: bytes | BaseException, held: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(transport.socket, "create_connection", lambda address, timeout: FakeSocket(b""))
    monkeypatch.setattr(transport.ssl, "create_default_context", lambda cafile: FakeContext(on_read))
    assert transport._controller_verdict(plaintext_session())[1] is held


def test_a_listener_reachable_from_the_network_address_is_the_attack_getting_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(transport, "_listeners", lambda session: {"postgres": 5432, "redis": 6379})
    reachable = {("127.0.0.1", 5432), ("127.0.0.1", 6379), ("192.0.2.7", 6379)}
    monkeypatch.setattr(transport, "_connects", lambda host, port: (host, port) in reachable)
    addresses = [types.SimpleNamespace(family=transport.socket.AF_INET, address=address)
                 for address in ("127.0.0.1", "192.0.2.7")]
    monkeypatch.setattr(transport.psutil, "net_if_addrs", lambda: {"eth0": addresses})
    said = list(transport.network_exposure(plaintext_session()))
    assert [item.held for item in said] == [None, False]
    assert said[1].observed == "reachable: redis (6379)"
    reachable.discard(("192.0.2.7", 6379))
    assert [item.held for item in transport.network_exposure(plaintext_session())] == [None, True]
    reachable.discard(("127.0.0.1", 6379))
    with pytest.raises(LabSetupError, match=r"not listening on 127\.0\.0\.1: redis"):
        list(transport.network_exposure(plaintext_session()))


def test_a_listener_reachable_only_over_ipv6_is_the_attack_getting_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bound to `::`, a server answers at the machine's IPv6 addresses while every IPv4 one looks closed."""
    monkeypatch.setattr(transport, "_listeners", lambda session: {"redis": 6379})
    reachable = {("127.0.0.1", 6379), ("fd00::7", 6379)}
    monkeypatch.setattr(transport, "_connects", lambda host, port: (host, port) in reachable)
    addresses = [types.SimpleNamespace(family=family, address=address) for family, address in (
        (transport.socket.AF_INET, "127.0.0.1"), (transport.socket.AF_INET, "192.0.2.7"),
        (transport.socket.AF_INET6, "::1"), (transport.socket.AF_INET6, "fd00::7"))]
    monkeypatch.setattr(transport.psutil, "net_if_addrs", lambda: {"eth0": addresses})
    said = list(transport.network_exposure(plaintext_session()))
    assert [(item.what, item.held) for item in said[1:]] == [
        ("every listener at this machine's address 192.0.2.7", True),
        ("every listener at this machine's address fd00::7", False)]


# --- money ---


class FakePayments:
    """Transfers of alice's account as a ledger without locks would take them, or as a correct one does."""

    def __init__(self, balance: int, overdraws: bool = False) -> None:
        self.balance, self.overdraws = balance, overdraws
        self.received = 0
        self.payments: dict[str, str] = {}
        self.lock = threading.RLock()  # the race's threads take turns: one transfer at a time, as a ledger would

    def Transfer(self, request: Any, metadata: Any, timeout: float) -> Any:
        with self.lock:
            return self.take(request)

    def take(self, request: Any) -> Any:
        key = request.idempotency_key
        if key in self.payments and not self.overdraws:
            return reply(self.payments[key])
        if self.balance < request.amount_minor and not self.overdraws:
            raise money.grpc.RpcError()  # answered as FAILED_PRECONDITION by `answer` below
        self.balance -= request.amount_minor
        self.received += request.amount_minor
        self.payments[key] = f"payment-{len(self.payments)}-{key}"
        return reply(self.payments[key])


def reply(payment_id: str) -> Any:
    return types.SimpleNamespace(payment=types.SimpleNamespace(payment_id=payment_id, status="COMPLETED"))


class FakeBank:
    def __init__(self, payments: FakePayments) -> None:
        self.payments = payments

    def open_account(self, owner: str, amount: int = 0) -> str:
        return owner

    def metadata(self, user: str) -> tuple[tuple[str, str], ...]:
        return ()

    def transfer_request(self, source: str, target: str, amount: int, key: str = "") -> Any:
        return types.SimpleNamespace(idempotency_key=key, amount_minor=amount)

    def balance(self, account: str) -> int:
        return self.payments.balance if account == "alice" else self.payments.received


def refusing_answer(call: Any) -> Answer:
    try:
        return Answer(OK, reply=call())
    except grpc.RpcError:
        return Answer(grpc.StatusCode.FAILED_PRECONDITION, "insufficient funds")


@pytest.mark.parametrize(("overdraws", "outcome"), [(False, Outcome.HELD), (True, Outcome.NOT_HELD)],
                         ids=["locked", "overdraws"])
def test_a_double_spend_holds_only_when_no_more_payments_complete_than_the_balance_covers(
    overdraws: bool, outcome: Outcome, monkeypatch: pytest.MonkeyPatch,
) -> None:
    payments = FakePayments(money.RACE_BALANCE, overdraws)
    monkeypatch.setattr(money, "Bank", lambda session, name: FakeBank(payments))
    monkeypatch.setattr(money, "answer", refusing_answer)
    said = list(money.double_spend(None))  # type: ignore[arg-type]
    assert outcome_of(said) is outcome
    if not overdraws:
        assert [item.held for item in said] == [True] * 5
        assert said[0].observed.startswith(f"{money.RACE_SHARED_KEY_SENDS} answer(s) naming 1 completed payment(s)")


def test_one_idempotency_key_that_completes_more_than_one_payment_does_not_hold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Idempotency keys ignored but the balance enforced: every debit matches a payment and money is conserved, so
    only the shared-key race shows the attack (three payments for one key)."""

    class KeysIgnored(FakePayments):
        def Transfer(self, request: Any, metadata: Any, timeout: float) -> Any:
            with self.lock:
                request.idempotency_key = f"{request.idempotency_key}-{len(self.payments)}"
                return super().Transfer(request, metadata, timeout)

    payments = KeysIgnored(money.RACE_BALANCE)
    monkeypatch.setattr(money, "Bank", lambda session, name: FakeBank(payments))
    monkeypatch.setattr(money, "answer", refusing_answer)
    said = list(money.double_spend(None))  # type: ignore[arg-type]
    assert [item.held for item in said] == [False, True, True, True, True]
    assert "naming 3 completed payment(s)" in said[0].observed


def storm(monkeypatch: pytest.MonkeyPatch, attempts: int, calls: list[tuple[float, str]], state: str) -> None:
    async def fake_storm(session: Any, downstream: str, sync_redis: Any) -> tuple[int, list[tuple[float, str]], str]:
        return attempts, calls, state

    class FakeRedis:
        def __init__(self, **options: Any) -> None:
            self.deleted: tuple[str, ...] = ()

        def delete(self, *keys: str) -> None:
            self.deleted = keys

        def close(self) -> None:
            pass

    monkeypatch.setattr(money, "_storm", fake_storm)
    monkeypatch.setattr(money.redis, "Redis", FakeRedis)


def storm_session() -> Any:
    ctx = types.SimpleNamespace(redis_options=lambda user, password: {}, credentials=types.SimpleNamespace(
        redis={"payments": "secret"}))
    return types.SimpleNamespace(ctx=ctx)


OPEN = "UNAVAILABLE: lab-x is unavailable (circuit open): try again later"
FAILED = "UNAVAILABLE: lab-x failed: UNAVAILABLE"


def test_a_retry_storm_holds_when_the_breaker_opens_and_then_answers_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = [(0.2, FAILED)] * 5 + [(0.001, OPEN)] * 25
    storm(monkeypatch, 15, calls, "open")
    said = list(money.retry_storm(storm_session()))
    assert [item.held for item in said] == [None, True, True, True]
    assert said[2].what == "calls 6 to 30, with the breaker open"


@pytest.mark.parametrize(("attempts", "calls", "state", "held"), [
    (90, [(0.2, FAILED)] * 30, "closed", [None, False, False]),
    (15, [(0.2, FAILED)] * 5 + [(0.5, OPEN)] * 25, "open", [None, True, False, True]),
    (15, [(0.2, FAILED)] * 5 + [(0.001, OPEN)] * 25, "half-open", [None, True, True, False]),
    (30, [(0.2, FAILED)] * 5 + [(0.001, OPEN)] * 25, "open", [None, False, True, True]),
], ids=["never-opens", "open-but-slow", "not-open-in-redis", "every-call-reached-it"])
def test_a_retry_storm_does_not_hold_when_the_breaker_fails_in_any_way(
    attempts: int, calls: list[tuple[float, str]], state: str, held: list[bool | None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storm(monkeypatch, attempts, calls, state)
    said = list(money.retry_storm(storm_session()))
    assert [item.held for item in said] == held
    assert outcome_of(said) is Outcome.NOT_HELD



# --- detection ---


class ProbedAccounts:
    """accounts.Deposit as a customer meets it: PERMISSION_DENIED, but for the calls given ANOTHER code."""

    def __init__(self, another: dict[int, grpc.StatusCode]) -> None:
        self.another, self.calls = another, 0

    def Deposit(self, request: Any, metadata: Any, timeout: float) -> Any:
        self.calls += 1
        raise RpcError(self.another.get(self.calls, grpc.StatusCode.PERMISSION_DENIED), "refused")


def probing(monkeypatch: pytest.MonkeyPatch, accounts: ProbedAccounts) -> Any:
    bank = types.SimpleNamespace(open_account=lambda owner: "acc-1", accounts=accounts,
                                 metadata=lambda user, correlation_id: ())
    monkeypatch.setattr(detection, "Bank", lambda session, name: bank)
    monkeypatch.setattr(detection, "_alert", lambda *args: None)  # no alert raised: the detection missed it
    infra = Path(__file__).resolve().parents[3] / "infra"
    return types.SimpleNamespace(ctx=types.SimpleNamespace(settings=types.SimpleNamespace(infra_dir=infra)),
                                 watch=lambda: types.SimpleNamespace(audit_after=None),
                                 target=types.SimpleNamespace(verdict_wait_seconds=0.0))


def test_permission_probing_does_not_hold_when_the_denials_raised_no_alert(monkeypatch: pytest.MonkeyPatch) -> None:
    evidence = list(detection.permission_probing(probing(monkeypatch, ProbedAccounts({}))))
    assert evidence[-1].held is False and "went unnoticed" in evidence[-1].observed


def test_permission_probing_cannot_tell_when_some_probes_were_not_denials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rate-limited or failing calls are no denials: fewer than the rule's threshold cannot raise its alert, and
    "the probing went unnoticed" would blame the detection for it."""
    session = probing(monkeypatch, ProbedAccounts({3: grpc.StatusCode.RESOURCE_EXHAUSTED}))
    with pytest.raises(LabSetupError, match="only 4 of 5 calls were denied by the policy"):
        list(detection.permission_probing(session))


# --- rate limit ---


class Limited:
    """accounts.ListAccounts for one user: OK for the first ALLOWED calls, then refused with DETAILS."""

    def __init__(self, allowed: int, details: str) -> None:
        self.allowed, self.details, self.calls = allowed, details, 0
        self.lock = threading.Lock()

    def ListAccounts(self, request: Any, metadata: Any, timeout: float) -> Any:
        with self.lock:
            self.calls += 1
            over = self.calls > self.allowed and ("user", "ada") in metadata
        if over:
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, self.details)
        return types.SimpleNamespace(accounts=[])


def bursting(monkeypatch: pytest.MonkeyPatch, accounts: Limited) -> Any:
    monkeypatch.setattr(edge.accounts_pb2_grpc, "AccountsStub", lambda channel: accounts)
    monkeypatch.setattr(edge, "_reset_window", lambda session, metadata, window_seconds: None)
    return types.SimpleNamespace(channel=lambda name: None,
                                 as_user=lambda user, correlation_id: (("user", user),))


def test_a_burst_holds_when_the_rate_limiter_refuses_it_and_another_user_is_served(
        monkeypatch: pytest.MonkeyPatch) -> None:
    limited = Limited(20, "rate limit of 60 calls per 60s exceeded")
    said = list(edge.rate_limit(bursting(monkeypatch, limited)))
    assert [item.held for item in said] == [None, True, True, None]


def test_a_burst_refused_by_another_limit_than_the_rate_limiters_does_not_hold(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """RESOURCE_EXHAUSTED is also the size cap's code: only the limiter's refusal shows the per-principal limit."""
    limited = Limited(20, "Received message larger than max (5000000 vs. 1048576)")
    said = list(edge.rate_limit(bursting(monkeypatch, limited)))
    assert said[1].held is False
