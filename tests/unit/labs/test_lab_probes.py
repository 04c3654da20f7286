"""Whole probes of the labs the first review left out (edge, ordering, keys, events, detection) and the platform
helpers they read evidence with, fed what a running stack would answer: each holds on the defence firing, and
does not hold (or stops as not run) on an answer, another refusal, or silence."""

import collections
import datetime as dt
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from confluent_kafka import KafkaError
from sqlalchemy import create_engine, event, insert
from sqlalchemy.pool import StaticPool

from bastion.access.v1.decision_pb2 import SecurityAlert
from bastion.audit.errors import CheckpointError
from bastion.audit.postgres import log as audit_log
from bastion.events.v1.envelope_pb2 import Envelope, EnvelopeBundle
from bastion.events.verify import BUNDLE_CONTENT, BUNDLE_HEADER
from bastion.labs import access, detection, edge, events, keys, ordering, supply
from bastion.labs.base import Evidence, Outcome
from bastion.labs.ordering import Applied
from bastion.labs.platform import (
    Answer,
    AuditEntry,
    DeadLetters,
    Delivery,
    EventRoute,
    LabSetupError,
    TopicTail,
    Watch,
    answer,
)
from bastion.payments.v1 import payments_pb2
from tests.unit.labs.fakes import RpcError
from tests.unit.labs.test_lab_checks import outcome_of

OK = grpc.StatusCode.OK
EXHAUSTED, INVALID = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT


def held(evidence: list[Evidence]) -> list[bool | None]:
    return [item.held for item in evidence]


class Watching:
    """A Watch that finds LINES[(service, event)] in the logs and ENTRIES in the audit log."""

    def __init__(self, lines: dict[tuple[str, str], list[str]] | None = None,
                 entries: list[AuditEntry] | None = None) -> None:
        self.lines, self.entries = lines or {}, entries or []
        self.audit_after = 41

    def log_lines(self, service: str, event: str, *needles: str, wait_seconds: float | None = None) -> list[str]:
        return self.lines.get((service, event), [])

    def audit_entries(self, correlation_id: str, count: int = 1, kind: str | None = None) -> list[AuditEntry]:
        return self.entries


# --- platform: answers, logs, the audit log, topics ---


def test_answer_is_ok_with_the_reply_or_the_status_code_and_details_of_a_refusal() -> None:
    done = answer(lambda: "the reply")
    assert (done.ok, done.reply, str(done)) == (True, "the reply", "OK")

    def refused() -> None:
        raise RpcError(grpc.StatusCode.NOT_FOUND, "no account")

    said = answer(refused)
    assert (said.ok, said.code, str(said)) == (False, grpc.StatusCode.NOT_FOUND, "NOT_FOUND: no account")
    assert not Answer(grpc.StatusCode.UNAVAILABLE).ok


def log_watch(tmp_path: Path, wait: float = 0.0) -> tuple[Watch, Path]:
    log = tmp_path / "notifications.log"
    log.write_text('{"event": "old", "correlation_id": "lab-x"}\n')
    watch = object.__new__(Watch)
    watch.session = types.SimpleNamespace(target=types.SimpleNamespace(  # type: ignore[assignment]
        service_logs={"notifications": log}, context_wait_seconds=wait))
    watch.log_offsets = {"notifications": log.stat().st_size}
    return watch, log


def test_a_watch_reads_only_the_lines_written_since_it_began_holding_every_needle(tmp_path: Path) -> None:
    watch, log = log_watch(tmp_path)
    assert watch.log_lines("notifications", "old") == [], "written before the watch began"
    with log.open("a") as out:
        out.write("event_dropped reason=duplicate lab-x\nevent_dropped lab-y\nevent_held lab-x\n")
    assert watch.log_lines("notifications", "event_dropped", "lab-x") == ["event_dropped reason=duplicate lab-x"]
    assert watch.log_lines("notifications", "nothing like it") == []
    assert watch.log_lines("audit", "event_dropped") == [], "a service whose log the target does not name"
    log.unlink()
    assert watch.new_text("notifications") == ""


def test_a_watch_waits_for_the_first_line_for_as_long_as_it_is_told(tmp_path: Path) -> None:
    watch, log = log_watch(tmp_path, wait=5.0)

    def write_later() -> None:
        with log.open("a") as out:
            out.write("sequence_gap_open lab-x\n")

    timer = threading.Timer(0.3, write_later)
    timer.start()
    try:
        assert watch.log_lines("notifications", "sequence_gap_open") == ["sequence_gap_open lab-x"]
    finally:
        timer.cancel()


@pytest.fixture()
def audit_session() -> Iterator[Any]:
    """A session whose audit database is an in-memory SQLite holding the audit log's table."""
    engine = create_engine("sqlite://", poolclass=StaticPool)

    @event.listens_for(engine, "connect")
    def as_postgres(conn: Any, record: Any) -> None:
        conn.execute("ATTACH DATABASE ':memory:' AS audit")
        conn.create_function("octet_length", 1, len)

    audit_log.create(engine)
    yield types.SimpleNamespace(audit_engine=lambda: engine, target=types.SimpleNamespace(
        service_logs={}, context_wait_seconds=0.0))
    engine.dispose()


def audit_record(engine: Any, seq: int, correlation_id: str, kind: str = "rejection", reason: str = "r") -> None:
    now = dt.datetime.now(dt.UTC)
    with engine.begin() as conn:
        conn.execute(insert(audit_log).values(
            seq=seq, kind=kind, topic="t", partition=0, offset=seq, event_id=f"e{seq}", event_type="x", producer="p",
            aggregate_id="a", correlation_id=correlation_id, occurred_at=now, recorded_at=now, envelope=b"",
            principal="notifications", reason=reason, prev_hash=bytes(32), hash=bytes(32)))


def test_a_watch_reads_the_audit_records_of_its_correlation_id_written_since_it_began(audit_session: Any) -> None:
    engine = audit_session.audit_engine()
    audit_record(engine, 1, "lab-x")
    watch = Watch(audit_session)
    assert watch.audit_after == 1
    audit_record(engine, 2, "lab-y")
    audit_record(engine, 3, "lab-x", kind="event")
    audit_record(engine, 4, "lab-x", reason="sequence_gap")
    assert [entry.seq for entry in watch.audit_entries("lab-x", count=2)] == [3, 4]
    assert [entry.seq for entry in watch.audit_entries("lab-x", kind="rejection")] == [4]
    assert str(watch.audit_entries("lab-x", kind="rejection")[0]) == "seq 4 rejection notifications sequence_gap"
    assert watch.audit_entries("lab-z", count=3) == [], "none within the wait: an empty list, never an error"


class Message:
    def __init__(self, value: bytes, headers: list[tuple[str, bytes]] | None = None,
                 error: Any = None) -> None:
        self._value, self._headers, self._error = value, headers, error

    def value(self) -> bytes:
        return self._value

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._headers

    def error(self) -> Any:
        return self._error


def test_a_topic_tail_yields_the_records_it_polls_and_skips_silence_and_passing_errors() -> None:
    polled = iter([None, Message(b"", error=KafkaError(KafkaError._PARTITION_EOF)),
                   Message(b"", error=KafkaError(KafkaError._TRANSPORT)), Message(b"the record")])
    tail = object.__new__(TopicTail)
    tail.reader = types.SimpleNamespace(poll=lambda timeout: next(polled, None))  # type: ignore[assignment]
    assert [message.value() for message in tail.records(0.3)] == [b"the record"]


def test_a_topic_tail_that_may_not_read_its_topic_stops_the_lab_rather_than_reading_as_silence() -> None:
    """No dead letter would read as "the event was not refused" (the attack getting through), blaming the consumers
    for what is the lab's own reader being refused."""
    polled = iter([Message(b"", error=KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)), Message(b"the record")])
    tail = object.__new__(TopicTail)
    tail.topic = "accounts.events.v1.dlq"
    tail.reader = types.SimpleNamespace(poll=lambda timeout: next(polled, None))  # type: ignore[assignment]
    with pytest.raises(LabSetupError, match=r"accounts\.events\.v1\.dlq cannot be read"):
        list(tail.records(0.3))


def dead_letter(source: str, consumer: str, reason: str) -> Message:
    return Message(b"", [("bastion-source", source.encode()), ("bastion-consumer", consumer.encode()),
                         ("bastion-reject-reason", reason.encode())])


def test_dead_letters_are_the_verdicts_of_the_named_consumers_on_that_record_only() -> None:
    dead = object.__new__(DeadLetters)
    letters = [dead_letter("t/0/4", "audit", "bad_signature"), dead_letter("t/0/5", "intruder", "bad_signature"),
               dead_letter("t/0/5", "audit", "unknown_key"), dead_letter("t/0/5", "notifications", "unknown_key"),
               dead_letter("t/0/5", "audit", "after all were found")]
    dead.records = lambda wait: iter(letters)  # type: ignore[method-assign]
    found = dead.verdicts("t/0/5", ("audit", "notifications"), 0.0)
    assert {name: headers["bastion-reject-reason"] for name, headers in found.items()} == {
        "audit": "unknown_key", "notifications": "unknown_key"}
    dead.records = lambda wait: iter(letters[:3])  # type: ignore[method-assign]
    assert set(dead.verdicts("t/0/5", ("audit", "notifications"), 0.0)) == {"audit"}
    dead.records = lambda wait: iter(letters[:2] + letters[3:4])  # type: ignore[method-assign]
    assert set(dead.verdicts("t/0/5", ("audit", "notifications"), 0.0)) == {"notifications"}, "audit's of t/0/4"


def envelope(aggregate_id: str, event_type: str = events.DEPOSITED, event_id: str = "ev") -> Envelope:
    return Envelope(aggregate_id=aggregate_id, event_type=event_type, event_id=event_id)


def tail_of(*messages: Message) -> Any:
    return types.SimpleNamespace(records=lambda wait: iter(messages))


def test_the_first_event_is_the_first_of_its_type_and_aggregate_alone_or_in_a_bundle() -> None:
    bundle = EnvelopeBundle(envelopes=[envelope("acc-2").SerializeToString(),
                                       envelope("acc-1", event_id="wanted").SerializeToString()]).SerializeToString()
    headers = [(BUNDLE_HEADER, BUNDLE_CONTENT)]
    tail = tail_of(Message(b"\xff\xff not an envelope"), Message(envelope("acc-1", "Other").SerializeToString()),
                   Message(bundle, headers), Message(envelope("acc-1", event_id="later").SerializeToString()))
    raw, kept, found = events.first_event(tail, "acc-1", events.DEPOSITED, 0.0)
    assert (raw, kept, found.event_id) == (bundle, headers, "wanted")
    alone = envelope("acc-1", event_id="alone").SerializeToString()
    assert events.first_event(tail_of(Message(alone)), "acc-1", events.DEPOSITED, 0.0)[2].event_id == "alone"
    with pytest.raises(LabSetupError, match=r"no bastion\.accounts\.v1\.MoneyDeposited of acc-3 appeared within 0s"):
        events.first_event(tail, "acc-3", events.DEPOSITED, 0.0)


# --- edge: the rate limit ---


class Limited:
    """accounts.ListAccounts with a per-principal limit of LIMIT calls for the burst user, answered with REFUSAL
    once spent (until the lab deletes the window's counter); OTHERS is what alice meets meanwhile."""

    def __init__(self, limit: int | None, refusal: grpc.RpcError | None = None,
                 others: grpc.RpcError | None = None, calibration: grpc.RpcError | None = None) -> None:
        self.limit, self.others, self.calibration = limit, others, calibration
        self.refusal = refusal or RpcError(EXHAUSTED, "rate limit of 600 calls per 7s exceeded")
        self.calls: collections.Counter[str] = collections.Counter()
        self.lock, self.reset_with = threading.Lock(), None

    def ListAccounts(self, request: Any, metadata: Any, timeout: float) -> Any:
        user = dict(metadata)["authorization"]
        with self.lock:
            self.calls[user] += 1
            count = self.calls[user]
        if self.calibration is not None:
            raise self.calibration
        if user == "alice":
            if self.others is not None:
                raise self.others
        elif self.limit is not None and count > self.limit and self.reset_with is None:
            raise self.refusal
        return types.SimpleNamespace(accounts=[])


def bursting(monkeypatch: pytest.MonkeyPatch, accounts: Limited) -> Any:
    monkeypatch.setattr(edge.accounts_pb2_grpc, "AccountsStub", lambda channel: accounts)

    def reset(session: Any, metadata: Any, window_seconds: int) -> None:
        accounts.reset_with = window_seconds  # type: ignore[assignment]

    monkeypatch.setattr(edge, "_reset_window", reset)
    return types.SimpleNamespace(channel=lambda service: None,
                                 as_user=lambda user, correlation_id: (("authorization", user),))


def test_a_burst_holds_when_the_user_is_refused_alone_and_the_lab_then_resets_her_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    accounts = Limited(limit=40)
    said = list(edge.rate_limit(bursting(monkeypatch, accounts)))
    assert held(said) == [None, True, True, None]
    assert said[1].observed.endswith("then RESOURCE_EXHAUSTED: rate limit of 600 calls per 7s exceeded")
    assert accounts.reset_with == 7, "the window the refusal states"
    assert said[3].observed == "OK"
    assert accounts.calls[edge.BURST_USER] < 40 + 1 + 2 * edge.BURST_THREADS, "the burst stops at the refusal"


def test_a_burst_never_refused_does_not_hold_and_stops_at_its_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    accounts = Limited(limit=None)
    said = list(edge.rate_limit(bursting(monkeypatch, accounts)))
    assert held(said) == [None, False, True, None]
    assert said[1].observed.endswith(f"no refusal in {accounts.calls[edge.BURST_USER] - 2} calls")
    assert edge.BURST_CAP <= accounts.calls[edge.BURST_USER] - 2 < edge.BURST_CAP + edge.BURST_THREADS
    assert accounts.reset_with == 60, "no refusal to read the window from: a minute"


def test_a_burst_that_also_locks_out_another_principal_does_not_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    accounts = Limited(limit=40, others=RpcError(EXHAUSTED, "rate limit of 600 calls per 60s exceeded"))
    said = list(edge.rate_limit(bursting(monkeypatch, accounts)))
    assert held(said) == [None, True, False, None]
    assert said[2].observed == "RESOURCE_EXHAUSTED: rate limit of 600 calls per 60s exceeded"
    assert outcome_of(said) is Outcome.NOT_HELD


def test_a_burst_refused_for_another_reason_than_the_rate_limit_does_not_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    """The limiter failing closed (Redis away) refuses with UNAVAILABLE: no rate limit, and the burst goes on."""
    accounts = Limited(limit=40, refusal=RpcError(grpc.StatusCode.UNAVAILABLE, "rate limiter unavailable"))
    said = list(edge.rate_limit(bursting(monkeypatch, accounts)))
    assert said[1].held is False and "no refusal in" in said[1].observed


def test_a_burst_user_who_cannot_list_her_accounts_stops_the_lab(monkeypatch: pytest.MonkeyPatch) -> None:
    accounts = Limited(limit=40, calibration=RpcError(grpc.StatusCode.UNAVAILABLE, "down"))
    with pytest.raises(LabSetupError, match="ada could not list accounts"):
        list(edge.rate_limit(bursting(monkeypatch, accounts)))
    assert accounts.reset_with is None


# --- edge: hostile input ---


class FakeBank:
    """Accounts of alice (1,000) and bob (0) whose balances REMAIN as given."""

    def __init__(self, balances: tuple[int, int] = (1_000, 0)) -> None:
        self.balances = dict(zip(("alice", "bob"), balances, strict=True))

    def open_account(self, owner: str, amount: int = 0) -> str:
        return owner

    def metadata(self, user: str, correlation_id: str = "") -> tuple[tuple[str, str], ...]:
        return (("authorization", user),)

    def balance(self, account: str) -> int:
        return self.balances[account]


def validating(request: bytes) -> Any:
    if len(request) > edge.MAX_MESSAGE_BYTES:
        raise RpcError(EXHAUSTED, "Received message larger than max (2097230 vs. 1048576)")
    if payments_pb2.TransferRequest.FromString(request).amount_minor <= 0:
        raise RpcError(INVALID, "amount_minor must be positive")
    return b""


def hostile(monkeypatch: pytest.MonkeyPatch, transfer: Callable[[bytes], Any], bank: FakeBank | None = None) -> Any:
    monkeypatch.setattr(edge, "Bank", lambda session, name: bank or FakeBank())
    channel = types.SimpleNamespace(unary_unary=lambda path: lambda request, metadata, timeout: transfer(request))
    return types.SimpleNamespace(channel=lambda service: channel)


def test_a_hand_written_transfer_carries_any_varint_as_its_amount() -> None:
    for wire, amount in ((0, 0), (2**64 - 5, -5), (2**63, -(2**63)), (2**64 - 1, -1), (300, 300)):
        request = payments_pb2.TransferRequest.FromString(edge._raw_transfer("src", "dst", edge._varint(wire), "k"))
        assert (request.idempotency_key, request.from_account_id, request.to_account_id, request.amount_minor,
                request.currency) == ("k", "src", "dst", amount, "EUR")
    assert edge._varint(2**64 - 1) == b"\xff" * 9 + b"\x01"
    fresh = payments_pb2.TransferRequest.FromString(edge._raw_transfer("s", "d", b"\x01"))
    assert fresh.idempotency_key.startswith("lab-hostile-input-") and fresh.amount_minor == 1


def test_hostile_input_holds_when_every_amount_is_invalid_and_the_oversized_request_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    said = list(edge.hostile_input(hostile(monkeypatch, validating)))
    assert held(said) == [True] * 6
    assert said[4].what == "a request of 2 MiB (the limit is 1 MiB)"
    assert said[5].observed == "alice 10.00 EUR, bob 0.00 EUR"


@pytest.mark.parametrize("refusal", [None, RpcError(INVALID, "currency must be EUR"),
                                     RpcError(grpc.StatusCode.FAILED_PRECONDITION, "insufficient amount")],
                         ids=["accepted", "another-field", "another-code"])
def test_a_hostile_amount_holds_only_when_refused_as_an_invalid_amount(
    refusal: grpc.RpcError | None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    def transfer(request: bytes) -> Any:
        if len(request) > edge.MAX_MESSAGE_BYTES:
            return validating(request)
        if refusal is not None:
            raise refusal
        return b""

    said = list(edge.hostile_input(hostile(monkeypatch, transfer)))
    assert held(said) == [False, False, False, False, True, True]
    assert outcome_of(said) is Outcome.NOT_HELD


def test_an_oversized_request_that_is_answered_or_the_money_that_moved_does_not_hold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_cap(request: bytes) -> Any:
        return b"" if len(request) > edge.MAX_MESSAGE_BYTES else validating(request)

    assert held(list(edge.hostile_input(hostile(monkeypatch, no_cap))))[4:] == [False, True]

    def key_refused(request: bytes) -> Any:
        if len(request) > edge.MAX_MESSAGE_BYTES:
            raise RpcError(INVALID, "idempotency_key is too long")
        return validating(request)

    assert held(list(edge.hostile_input(hostile(monkeypatch, key_refused))))[4] is False, "past the cap: no cap"
    assert held(list(edge.hostile_input(hostile(monkeypatch, validating, FakeBank((995, 5))))))[5] is False
    assert held(list(edge.hostile_input(hostile(monkeypatch, validating, FakeBank((1_000, 5))))))[5] is False


# --- ordering ---


class Consumer:
    """One consumer's database for the lab's account as the events published so far leave it (after both, one
    state per read until the last)."""

    def __init__(self, after_second: Applied | None, *after_both: Applied) -> None:
        self.after_second, self.after_both = after_second, list(after_both)

    def read_after_both(self) -> Applied:
        return self.after_both.pop(0) if len(self.after_both) > 1 else self.after_both[0]


IN_ORDER = Consumer(Applied((), 0, 1), Applied((1, 2), 2, 0))


def reordering(monkeypatch: pytest.MonkeyPatch, consumers: dict[str, Consumer],
               lines: dict[tuple[str, str], list[str]] | None = None, wait: float = 0.0) -> tuple[Any, list[bytes]]:
    published: list[bytes] = []
    monkeypatch.setattr(ordering, "forged_deposit", lambda session, producer, topic, amount, cid, sequence, **kw:
                        types.SimpleNamespace(aggregate_id="acc-00000001",
                                              SerializeToString=lambda: f"event {sequence}".encode()))
    monkeypatch.setattr(ordering, "_engine", lambda session, service: types.SimpleNamespace(
        name=service, dispose=lambda: None))
    monkeypatch.setattr(ordering, "_publish", lambda session, topic, record, account: published.append(record))

    def applied(engine: Any, account: str) -> Applied:
        consumer = consumers[engine.name]
        if published == [b"event 2"]:
            return consumer.after_second or Applied((), 0, 0)
        return consumer.read_after_both() if published == [b"event 2", b"event 1"] else Applied((), 0, 0)

    monkeypatch.setattr(ordering, "_applied", applied)
    session = types.SimpleNamespace(
        target=types.SimpleNamespace(event_routes={events.ACCOUNTS_TOPIC: EventRoute("t.v1", ("audit", *consumers))},
                                     verdict_wait_seconds=wait),
        ctx=types.SimpleNamespace(service_names=["audit", "accounts", *consumers]),
        watch=lambda: Watching(lines))
    return session, published


def test_reordered_events_hold_when_each_consumer_holds_2_back_then_applies_1_and_2(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lines = {("notifications", "event_held_behind_sequence_gap"): ["held: sequence 2"]}
    session, published = reordering(monkeypatch, {"notifications": IN_ORDER, "payments": IN_ORDER}, lines)
    said = list(ordering.reordered_events(session))
    assert held(said) == [None, True, None, True, None, True, True]
    assert [item.what for item in said][1:3] == ["notifications holds event 2 back", "notifications.log"]
    assert published == [b"event 2", b"event 1"]
    assert said[-1].observed == "inbox holds sequences [1, 2], last applied sequence 2, 0 held"


@pytest.mark.parametrize("consumer", [
    Consumer(Applied((2,), 2, 0), Applied((2,), 2, 0)),  # applied 2 at once, then dropped 1 as a replay
    Consumer(Applied((2,), 2, 0), Applied((1, 2), 1, 0)),  # applied 2 at once, then 1: last applied 1
    Consumer(Applied((), 0, 2), Applied((1, 2), 2, 0)),  # held two
    Consumer(Applied((2,), 2, 1), Applied((1, 2), 2, 0)),  # applied 2 and held it as well
], ids=["dropped-1", "applied-out-of-order", "held-two", "held-and-applied"])
def test_a_consumer_that_does_not_hold_event_2_back_alone_does_not_hold(
    consumer: Consumer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    session, _ = reordering(monkeypatch, {"notifications": consumer})
    said = list(ordering.reordered_events(session))
    assert said[1].held is False
    assert outcome_of(said) is Outcome.NOT_HELD


@pytest.mark.parametrize("after_both", [Applied((1,), 1, 1), Applied((1, 2), 2, 1), Applied((1, 2), 1, 0),
                                        Applied((1, 2, 2), 2, 0)],
                         ids=["2-left-held", "2-also-still-held", "last-is-1", "2-applied-twice"])
def test_a_consumer_that_does_not_then_apply_1_and_2_once_each_in_order_does_not_hold(
    after_both: Applied, monkeypatch: pytest.MonkeyPatch,
) -> None:
    session, _ = reordering(monkeypatch, {"notifications": Consumer(Applied((), 0, 1), after_both)})
    said = list(ordering.reordered_events(session))
    assert held(said) == [None, True, None, False]


def test_the_lab_waits_for_both_events_to_be_applied_before_judging_the_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slow = Consumer(Applied((), 0, 1), Applied((), 0, 1), Applied((1,), 1, 1), Applied((1, 2), 2, 0))
    session, _ = reordering(monkeypatch, {"notifications": slow}, wait=5.0)
    assert held(list(ordering.reordered_events(session))) == [None, True, None, True]


def test_a_consumer_that_takes_neither_event_stops_the_lab(monkeypatch: pytest.MonkeyPatch) -> None:
    session, published = reordering(monkeypatch, {"notifications": Consumer(None, Applied((), 0, 0))})
    with pytest.raises(LabSetupError, match="notifications took neither event within 0s"):
        list(ordering.reordered_events(session))
    assert published == [b"event 2", b"event 1"], "event 1 published whatever happened"


def test_a_consumer_that_reads_but_kept_no_trace_of_event_2_does_not_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    session, _ = reordering(monkeypatch, {"notifications": Consumer(None, Applied((1,), 1, 0))})
    said = list(ordering.reordered_events(session))
    assert held(said) == [None, False, None, False]


def test_reordered_events_need_a_consumer_of_the_platform_that_applies_them(monkeypatch: pytest.MonkeyPatch) -> None:
    session, _ = reordering(monkeypatch, {})
    with pytest.raises(LabSetupError, match=r"t\.v1 has no verifying consumer"):
        list(ordering.reordered_events(session))
    session, _ = reordering(monkeypatch, {"lab-stand-in": IN_ORDER})
    session.ctx.service_names.remove("lab-stand-in")
    with pytest.raises(LabSetupError, match=r"t\.v1 has no verifying consumer"):
        list(ordering.reordered_events(session))


# --- detection: the suppressed event ---


def gap_alert(key: str = "notifications", rule: str = detection.GAP_RULE) -> detection.FoundAlert:
    return detection.FoundAlert(9, "audit", "alert-1", SecurityAlert(rule=rule, key=key, counted_by="consumer"))


GAP_RECORD = AuditEntry(8, "rejection", "notifications", None, None, "sequence_gap")
GAP_LINES = {("notifications", "event_held_behind_sequence_gap"): ["held line"],
             ("notifications", "sequence_gap_open"): ["gap line"]}


def suppressing(monkeypatch: pytest.MonkeyPatch, watch: Watching, found: detection.FoundAlert | None,
                delivery: Delivery | None = None, consumers: tuple[str, ...] = ("audit", "notifications")) -> Any:
    monkeypatch.setattr(detection, "_rule", lambda session, name: None)
    monkeypatch.setattr(detection, "forged_deposit", lambda *args, **kwargs: types.SimpleNamespace(
        aggregate_id="acc-00000001", SerializeToString=lambda: b"event 2"))
    monkeypatch.setattr(detection, "_alert", lambda session, after, rule, ids, wait: found)
    monkeypatch.setattr(detection, "_recipients_told", lambda session, alert: iter(
        [Evidence("ada's notifications", "told", True)]))
    return types.SimpleNamespace(
        target=types.SimpleNamespace(event_routes={events.ACCOUNTS_TOPIC: EventRoute("t.v1", consumers)},
                                     verdict_wait_seconds=0.0),
        ctx=types.SimpleNamespace(settings=types.SimpleNamespace(sequence_gap_alert_seconds=0.0)),
        watch=lambda: watch, publish=lambda principal, topic, record, key: delivery or Delivery(None, "t.v1/0/5"))


def test_a_suppressed_event_holds_when_held_reported_recorded_and_raised_as_an_alert(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    said = list(detection.suppressed_event(suppressing(monkeypatch, Watching(GAP_LINES, [GAP_RECORD]), gap_alert())))
    assert held(said) == [None, None, True, True, True, True, True]
    assert said[-3].observed == "seq 8 rejection notifications sequence_gap"
    assert outcome_of(said) is Outcome.HELD


@pytest.mark.parametrize(("lines", "entries", "found", "position"), [
    ({**GAP_LINES, ("notifications", "event_held_behind_sequence_gap"): []}, [GAP_RECORD], gap_alert(), 2),
    ({**GAP_LINES, ("notifications", "sequence_gap_open"): []}, [GAP_RECORD], gap_alert(), 3),
    (GAP_LINES, [], gap_alert(), 4),
    (GAP_LINES, [AuditEntry(8, "rejection", "notifications", None, None, "bad_signature")], gap_alert(), 4),
    (GAP_LINES, [GAP_RECORD, GAP_RECORD], gap_alert(), 4),
    (GAP_LINES, [GAP_RECORD], gap_alert(key="alice"), 5),
    (GAP_LINES, [GAP_RECORD], None, 5),
], ids=["not-held", "gap-not-reported", "no-record", "another-reason", "too-many-records", "alert-of-another",
        "no-alert"])
def test_a_suppressed_event_does_not_hold_when_any_step_of_the_defence_is_missing(
    lines: dict[tuple[str, str], list[str]], entries: list[AuditEntry], found: detection.FoundAlert | None,
    position: int, monkeypatch: pytest.MonkeyPatch,
) -> None:
    said = list(detection.suppressed_event(suppressing(monkeypatch, Watching(lines, entries), found)))
    assert said[position].held is False
    assert [item.held for item in said[2:] if item.held is False] == [False], said
    assert outcome_of(said) is Outcome.NOT_HELD


def test_a_suppressed_event_the_broker_refused_or_no_consumer_to_hold_it_stops_the_lab(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from confluent_kafka import KafkaError
    refused = Delivery(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "no acl"))
    session = suppressing(monkeypatch, Watching(GAP_LINES, [GAP_RECORD]), gap_alert(), refused)
    with pytest.raises(LabSetupError, match=r"accounts could not write to t\.v1: no acl"):
        list(detection.suppressed_event(session))
    session = suppressing(monkeypatch, Watching(GAP_LINES, [GAP_RECORD]), gap_alert(), consumers=("audit",))
    with pytest.raises(LabSetupError, match=r"t\.v1 has no verifying consumer"):
        list(detection.suppressed_event(session))


class Inbox:
    """ListNotifications over PAGES of (sequence, event_id) per user, LIMIT at a time after AFTER_SEQUENCE."""

    def __init__(self, notes: dict[str, list[tuple[int, str]]]) -> None:
        self.notes, self.calls = notes, 0

    def ListNotifications(self, request: Any, metadata: Any, timeout: float) -> Any:
        self.calls += 1
        user = dict(metadata)["authorization"]
        page = [types.SimpleNamespace(sequence=sequence, event_id=event_id, text=f"text of {event_id}")
                for sequence, event_id in self.notes.get(user, []) if sequence > request.after_sequence]
        return types.SimpleNamespace(notifications=page[:request.limit])


def notifications_session(inbox: Inbox, wait: float = 0.0) -> Any:
    return types.SimpleNamespace(channel=lambda service: None, target=types.SimpleNamespace(verdict_wait_seconds=wait),
                                 as_user=lambda user, correlation_id: (("authorization", user),),
                                 ctx=types.SimpleNamespace(settings=types.SimpleNamespace(infra_dir=Path("infra"))))


def test_each_alert_recipient_holds_only_when_told_of_that_very_alert_even_past_a_full_page(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    page = detection.NOTIFICATIONS_PAGE
    inbox = Inbox({"ada": [(n, f"other-{n}") for n in range(1, page + 1)] + [(page + 1, "alert-1")],
                   "sam": [(1, "alert-2")]})
    monkeypatch.setattr(detection.notifications_pb2_grpc, "NotificationsStub", lambda channel: inbox)
    monkeypatch.setattr(detection, "load_alert_recipients", lambda path: ("ada", "sam"))
    said = list(detection._recipients_told(notifications_session(inbox), gap_alert()))
    assert held(said) == [True, False]
    assert said[0].observed == "text of alert-1"
    assert said[1].observed == "no notification of alert alert-1 within 0s"
    assert detection._told(notifications_session(inbox), inbox, "ada", "none", 0) == (None, page + 1)


# --- events: the replayed event ---


def replaying(monkeypatch: pytest.MonkeyPatch, told: list[int], dropped: list[str], kept: int = 2,
              delivery: Delivery | None = None) -> Any:
    monkeypatch.setattr(events, "Bank", lambda session, name: types.SimpleNamespace(
        open_account=lambda owner: "acc-1", deposit=lambda account, amount, correlation_id: None))
    monkeypatch.setattr(events.notifications_pb2_grpc, "NotificationsStub", lambda channel: None)
    monkeypatch.setattr(events, "last_notification", lambda session, inbox: 0)
    monkeypatch.setattr(events, "TopicTail", lambda session, topic: types.SimpleNamespace(close=lambda: None))
    monkeypatch.setattr(events, "first_event", lambda tail, account, event_type, wait: (
        b"raw", [], envelope("acc-1", event_id="ev-1")))
    counts = iter(told)
    monkeypatch.setattr(events, "times_told", lambda session, inbox, event_id, after, wait: next(counts))
    entries = [AuditEntry(seq, "event", None, None, None, None) for seq in range(1, kept + 1)]
    watch = Watching({("notifications", "event_dropped"): dropped}, entries)
    return types.SimpleNamespace(
        target=types.SimpleNamespace(event_routes={events.ACCOUNTS_TOPIC: EventRoute("t.v1", ("notifications",))},
                                     verdict_wait_seconds=0.0),
        channel=lambda service: None, watch=lambda: watch,
        publish=lambda principal, topic, raw, key, headers: delivery or Delivery(None, "t.v1/0/7"))


def test_a_replayed_event_holds_when_dropped_and_bob_is_told_once(monkeypatch: pytest.MonkeyPatch) -> None:
    said = list(events.replayed_event(replaying(monkeypatch, [1, 1], ["event_dropped reason=duplicate ev-1"])))
    assert held(said) == [None, None, None, True, True, None]
    assert said[-1].observed.startswith("seq 1 (genuine) and seq 2 (replay)")


@pytest.mark.parametrize(("told", "dropped", "position"), [
    ([1, 2], ["event_dropped reason=duplicate ev-1"], 4),
    ([1, 1], [], 3),
], ids=["told-twice", "no-drop"])
def test_a_replayed_event_applied_again_or_not_dropped_does_not_hold(
    told: list[int], dropped: list[str], position: int, monkeypatch: pytest.MonkeyPatch,
) -> None:
    said = list(events.replayed_event(replaying(monkeypatch, told, dropped, kept=1)))
    assert said[position].held is False and len(said) == 5


@pytest.mark.parametrize("told", [0, 2])
def test_a_replay_lab_whose_genuine_deposit_was_not_told_once_stops(told: int, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LabSetupError, match=f"did not arrive \\({told} found\\)"):
        list(events.replayed_event(replaying(monkeypatch, [told], [])))


def test_times_told_counts_that_event_only_among_bobs_notifications_after_the_mark() -> None:
    inbox = Inbox({"bob": [(1, "ev-1"), (2, "ev-2"), (3, "ev-1"), (4, "ev-1")]})
    session = notifications_session(inbox)
    assert events.times_told(session, inbox, "ev-1", 1, wait=False) == 2  # type: ignore[arg-type]
    assert events.times_told(session, inbox, "ev-9", 0, wait=True) == 0  # type: ignore[arg-type]
    many = Inbox({"bob": [(n, "x") for n in range(1, events.NOTIFICATIONS_PAGE + 3)]})
    assert events.last_notification(notifications_session(many), many) == events.NOTIFICATIONS_PAGE + 2  # type: ignore[arg-type]
    assert many.calls == 2
    assert events.last_notification(notifications_session(Inbox({})), Inbox({})) == 0  # type: ignore[arg-type]


def test_times_told_waits_for_the_first_notification_when_told_to() -> None:
    class Late(Inbox):
        def ListNotifications(self, request: Any, metadata: Any, timeout: float) -> Any:
            if self.calls == 2:
                self.notes["bob"].append((7, "ev-1"))
            return super().ListNotifications(request, metadata, timeout)

    late = Late({"bob": []})
    assert events.times_told(notifications_session(late, wait=5.0), late, "ev-1", 0, wait=True) == 1  # type: ignore[arg-type]
    assert late.calls == 3


# --- keys: a forged checkpoint on a scratch copy ---


class Line:
    def __init__(self, key_id: str, length: int) -> None:
        self.key_id, self.length = key_id, length

    def to_json(self) -> str:
        return f'{{"key": "{self.key_id}", "length": {self.length}}}'


def checkpoint_file(monkeypatch: pytest.MonkeyPatch, lines: list[Line], load: Callable[[Path], list[Any]]) -> None:
    class File:
        def __init__(self, path: Path, trust: Any, origin: str) -> None:
            self.path = path

        def lines(self) -> list[tuple[int, Line]]:
            return list(enumerate(lines, start=1))

        def load(self) -> list[Any]:
            return load(self.path)

    monkeypatch.setattr(keys, "CheckpointFile", File)


def test_a_forged_checkpoint_holds_when_refused_or_set_aside_and_not_when_believed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    genuine = tmp_path / "checkpoints.jsonl"
    beside, forged = Line("new", 5), Line("old", 6)
    genuine.write_text(Line("old", 3).to_json() + "\n" + beside.to_json() + "\n")
    copies: list[list[str]] = []

    def refuse(copy: Path) -> list[Any]:
        copies.append(copy.read_text().splitlines())
        raise CheckpointError(f"{copy}: a retired key signs no more")

    checkpoint_file(monkeypatch, [], refuse)
    refused = keys.verdict_on_copy(genuine, None, "after", forged, beside, after=True)  # type: ignore[arg-type]
    assert refused.held is True and refused.observed.startswith("checkpoint refused: CheckpointError: SCRATCH")
    keys.verdict_on_copy(genuine, None, "before", forged, beside)  # type: ignore[arg-type]
    assert copies == [[Line("old", 3).to_json(), beside.to_json(), forged.to_json()],
                      [Line("old", 3).to_json(), forged.to_json(), beside.to_json()]]
    assert genuine.read_text().count("\n") == 2, "the install's own file untouched"
    checkpoint_file(monkeypatch, [], lambda copy: [beside, forged])
    believed = keys.verdict_on_copy(genuine, None, "after", forged, beside)  # type: ignore[arg-type]
    assert (believed.held, believed.observed) == (False, "the forged checkpoint is believed")
    checkpoint_file(monkeypatch, [], lambda copy: [beside])
    aside = keys.verdict_on_copy(genuine, None, "after", forged, beside)  # type: ignore[arg-type]
    assert (aside.held, aside.observed) == (True, "loaded, the forgery set aside")


@pytest.mark.parametrize(("lines", "forged_length", "beside"), [
    ([Line("leaked", 1), Line("leaked", 3), Line("new", 5)], 2, 1),
    ([Line("leaked", 2), Line("new", 5)], 1, 0),
    ([Line("older", 1), Line("leaked", 4), Line("leaked", 9)], 5, 2),
    ([Line("leaked", 1), Line("leaked", 2), Line("new", 9)], None, None),
    ([Line("older", 1), Line("leaked", 3)], None, None),
], ids=["between-two", "before-the-first", "not-after-another-key", "no-room", "room-only-after-another-key"])
def test_a_forgery_among_the_leaked_keys_own_goes_where_its_lines_leave_room(
    lines: list[Line], forged_length: int | None, beside: int | None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    checkpoint_file(monkeypatch, lines, lambda copy: [])
    tried: list[tuple[int, Line]] = []
    monkeypatch.setattr(keys, "sign_checkpoint", lambda key, origin, head: head)
    monkeypatch.setattr(keys, "verdict_on_copy", lambda path, trust, where, forged, line: (
        tried.append((forged.length, line)) or Evidence(where, "refused", True)))
    said = list(keys._among_the_leaked_keys_own(Path("file"), None, types.SimpleNamespace(key_id="leaked")))  # type: ignore[arg-type]
    if forged_length is None:
        assert held(said) == [None] and said[0].observed.startswith("not tried")
    else:
        assert tried == [(forged_length, lines[beside])] and held(said) == [True]  # type: ignore[index]


def test_the_leaked_signing_key_drill_stops_when_the_producer_does_not_sign_with_the_new_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    retired: list[str] = []
    ring = types.SimpleNamespace(signing_key=lambda producer: types.SimpleNamespace(key_id="old"),
                                 rotate=lambda producer: "new", retire=lambda producer, key: retired.append(key))
    monkeypatch.setattr(keys, "FOLLOW_WAIT_SECONDS", 0.0)
    monkeypatch.setattr(keys, "Bank", lambda session, name: types.SimpleNamespace(
        open_account=lambda owner: "acc-1", deposit=lambda account, amount, correlation_id: None))
    monkeypatch.setattr(keys.notifications_pb2_grpc, "NotificationsStub", lambda channel: None)
    monkeypatch.setattr(keys, "last_notification", lambda session, inbox, lab: 0)
    monkeypatch.setattr(keys, "TopicTail", lambda session, topic: types.SimpleNamespace(close=lambda: None))
    signed_with = ["old"]
    monkeypatch.setattr(keys, "first_event", lambda tail, account, event_type, wait: (
        b"", [], types.SimpleNamespace(event_id="ev-1", key_id=signed_with[0])))
    monkeypatch.setattr(keys, "_read_past_the_rotation", lambda session, producer, wait: iter([]))
    told = [2]
    monkeypatch.setattr(keys, "times_told", lambda *args, **kwargs: told[0])
    monkeypatch.setattr(keys, "forged_deposit", lambda *args, **kwargs: Envelope())
    monkeypatch.setattr(keys, "inject", lambda *args: iter([Evidence("verdict of notifications", "unknown_key",
                                                                        True)]))
    session = types.SimpleNamespace(key_ring=lambda: ring, channel=lambda service: None,
                                    target=types.SimpleNamespace(verdict_wait_seconds=0.0))
    said = list(keys.leaked_signing_key(session))  # type: ignore[arg-type]
    assert held(said) == [None, None, False] and retired == [], "the old key left verify-only"
    signed_with[0] = "new"
    said = list(keys.leaked_signing_key(session))  # type: ignore[arg-type]
    assert held(said) == [None, None, True, False, None, None, True] and retired == ["old"]
    told[0] = 1
    assert held(list(keys.leaked_signing_key(session)))[3] is True  # type: ignore[arg-type]


def test_a_key_is_retired_only_once_every_reader_of_its_producer_has_read_past_the_rotation() -> None:
    behind: list[str] = ["notifications-group (2 unread)"]
    infra = Path(__file__).resolve().parents[3] / "infra"
    session = types.SimpleNamespace(
        ctx=types.SimpleNamespace(settings=types.SimpleNamespace(infra_dir=infra),
                                  service_names=["accounts", "payments", "notifications", "audit"]),
        behind=lambda groups, wait: behind)
    with pytest.raises(LabSetupError, match="did not read past the rotation within 3s"):
        list(keys._read_past_the_rotation(session, "accounts", 3.0))  # type: ignore[arg-type]
    behind.clear()
    [said] = keys._read_past_the_rotation(session, "accounts", 3.0)  # type: ignore[arg-type]
    assert said.held is None and "has read past the rotation" in said.observed



def test_an_audit_key_drill_stops_before_retiring_while_the_log_would_be_left_unanchored(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    retired: list[str] = []
    ring = types.SimpleNamespace(signing_key=lambda producer: types.SimpleNamespace(key_id="old"),
                                 rotate=lambda producer: "new", trust_store=lambda: None,
                                 retire=lambda producer, key: retired.append(key))
    checkpoint_file(monkeypatch, [Line("old", 3), Line("new", 5)], lambda copy: [])
    monkeypatch.setattr(keys, "unanchored_if_retired", lambda layout, key_id: "records 4 to 5 vouched for by old only")
    session = types.SimpleNamespace(key_ring=lambda: ring, ctx=types.SimpleNamespace(layout=types.SimpleNamespace(
        audit_checkpoints_file=tmp_path / "checkpoints.jsonl")))
    said = list(keys.leaked_audit_key(session))  # type: ignore[arg-type]
    assert held(said) == [None, None, False] and retired == []
    assert said[2].observed == "none yet: records 4 to 5 vouched for by old only"


# --- detection: permission probing and its alert ---


def alert_record(engine: Any, seq: int, alert: SecurityAlert, producer: str = "audit", kind: str = "event") -> None:
    now = dt.datetime.now(dt.UTC)
    with engine.begin() as conn:
        conn.execute(insert(audit_log).values(
            seq=seq, kind=kind, topic="security.alerts.v1", partition=0, offset=seq, event_id=f"alert-{seq}",
            event_type=SecurityAlert.DESCRIPTOR.full_name, producer=producer, aggregate_id="a",
            correlation_id="c", occurred_at=now, recorded_at=now, envelope=alert.SerializeToString(),
            prev_hash=bytes(32), hash=bytes(32)))


def test_the_alert_is_the_audit_services_of_that_rule_whose_last_refusal_is_one_of_the_labs(
    audit_session: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(detection, "alert_in", SecurityAlert.FromString)
    engine = audit_session.audit_engine()
    ours = SecurityAlert(rule=detection.RULE, key="alice", last_correlation_id="lab-2")
    alert_record(engine, 1, ours)  # before the watch began
    alert_record(engine, 2, SecurityAlert(rule=detection.RULE, key="alice", last_correlation_id="someone-else"))
    alert_record(engine, 3, SecurityAlert(rule=detection.GAP_RULE, key="alice", last_correlation_id="lab-1"))
    alert_record(engine, 4, ours, producer="payments")
    alert_record(engine, 5, ours, kind="rejection")
    assert detection._alert(audit_session, 1, detection.RULE, {"lab-1", "lab-2"}, 0.0) is None
    alert_record(engine, 6, ours)
    found = detection._alert(audit_session, 1, detection.RULE, {"lab-1", "lab-2"}, 0.0)
    assert found is not None and (found.seq, found.producer, found.event_id, found.alert) == (6, "audit", "alert-6",
                                                                                              ours)


class Depositing:
    """accounts.Deposit as a policy without the teller rule answers it: OK."""

    def __init__(self) -> None:
        self.calls = 0

    def Deposit(self, request: Any, metadata: Any, timeout: float) -> Any:
        self.calls += 1
        return types.SimpleNamespace()


def test_permission_probing_does_not_hold_when_the_customer_deposits_or_the_alert_names_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.unit.labs.test_lab_checks import ProbedAccounts, probing
    accounts = Depositing()
    said = list(detection.permission_probing(probing(monkeypatch, accounts)))  # type: ignore[arg-type]
    assert held(said) == [None, False] and said[1].observed == "OK: she deposited" and accounts.calls == 1
    session = probing(monkeypatch, ProbedAccounts({}))
    session.watch = lambda: Watching()
    monkeypatch.setattr(detection, "_recipients_told", lambda session, found: iter([]))
    for key, verdict in (("alice", True), ("bob", False)):
        monkeypatch.setattr(detection, "_alert", lambda *args, key=key: detection.FoundAlert(
            9, "audit", "alert-1", SecurityAlert(rule=detection.RULE, key=key)))
        assert held(list(detection.permission_probing(session)))[-1] is verdict


# --- supply: the tampered package ---


def installing(monkeypatch: pytest.MonkeyPatch, result: tuple[int, str], imports: bool) -> Any:
    """The lab's install of a backdoored tenacity ending with RESULT (exit status, pip's stderr), after which the
    scratch virtualenv IMPORTS it or not."""
    monkeypatch.setattr(supply, "_locked", lambda name: types.SimpleNamespace(
        name="tenacity", version="9.0.0", text="tenacity==9.0.0 --hash=sha256:aa"))
    monkeypatch.setattr(supply.venv, "EnvBuilder", lambda with_pip: types.SimpleNamespace(create=lambda target: None))
    monkeypatch.setattr(supply, "build_wheel", lambda index, name, version, files: index / f"{name}.whl")
    monkeypatch.setattr(supply, "sha256_of", lambda path: "00")
    results = iter([(0, ""), result])

    def install(target: Path, lock: Path, index: Path) -> Any:
        status, stderr = next(results)
        return supply.subprocess.CompletedProcess([], status, "", stderr)

    monkeypatch.setattr(supply, "_install", install)
    monkeypatch.setattr(supply, "_imports", lambda target, module: module == "bastion_lab_genuine" or imports)
    return None


REFUSED = (1, f"ERROR: THESE PACKAGES {supply.HASH_REFUSAL} FROM THE REQUIREMENTS FILE.\n"
              "    tenacity==9.0.0 from file:///index/tenacity.whl:\n        Expected sha256 aa\n             Got bb\n")


@pytest.mark.parametrize(("result", "imports", "verdict"), [
    (REFUSED, False, True),
    (REFUSED, True, False),
    ((0, ""), True, False),
], ids=["refused", "refused-but-installed", "accepted"])
def test_a_backdoored_package_holds_only_when_refused_for_its_hash_and_not_installed(
    result: tuple[int, str], imports: bool, verdict: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    said = list(supply.tampered_package(installing(monkeypatch, result, imports)))
    assert held(said) == [None, None, verdict]
    if verdict:
        assert said[2].observed == (f"refused: pip: THESE PACKAGES {supply.HASH_REFUSAL}: tenacity==9.0.0, locked "
                                    "sha256 aa…, served bb…")


def test_a_package_install_that_failed_for_another_reason_stops_the_lab(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LabSetupError, match="failed for another reason than the hashes: OSError: no space left"):
        list(supply.tampered_package(installing(monkeypatch, (1, "OSError: no space left on device"), False)))


# --- access: impersonation, another customer's account ---


def impersonating(monkeypatch: pytest.MonkeyPatch, calibration: grpc.StatusCode = grpc.StatusCode.NOT_FOUND,
                  bank: FakeBank | None = None) -> Any:
    """accounts.ApplyTransfer behind its method policy: payments' certificate and token admitted, others refused."""

    class Stub:
        def __init__(self, identity: str) -> None:
            self.identity = identity

        def ApplyTransfer(self, request: Any, metadata: Any, timeout: float) -> Any:
            token = dict(metadata)["authorization"].removeprefix("Bearer ")
            if (self.identity, token) == ("payments", "payments"):
                raise RpcError(calibration, "no such account")
            if token == "notifications":
                raise RpcError(grpc.StatusCode.UNAUTHENTICATED, "invalid token: wrong_audience")
            raise RpcError(grpc.StatusCode.PERMISSION_DENIED, "not allowed by the policy")

    monkeypatch.setattr(access, "Bank", lambda session, name: bank or FakeBank())
    monkeypatch.setattr(access.accounts_pb2_grpc, "AccountsStub", Stub)
    return types.SimpleNamespace(channel=lambda service, identity: identity, service_token=lambda name: name,
                                 user_token=lambda user: user, watch=lambda: Watching())


def test_service_impersonation_holds_when_only_payments_is_admitted_and_nothing_moves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    said = list(access.service_impersonation(impersonating(monkeypatch)))
    assert held(said) == [None, True, True, True, True]
    assert held(list(access.service_impersonation(impersonating(monkeypatch, bank=FakeBank((500, 500))))))[-1] is False
    with pytest.raises(LabSetupError, match="the payments identity itself was not admitted"):
        list(access.service_impersonation(impersonating(monkeypatch, grpc.StatusCode.PERMISSION_DENIED)))


class Accounts:
    """alice's and bob's accounts as accounts and payments answer bob: alice's hidden (NOT_FOUND) unless LEAKS."""

    def __init__(self, leaks: bool = False) -> None:
        self.leaks = leaks

    def GetAccount(self, request: Any, metadata: Any, timeout: float) -> Any:
        if dict(metadata)["authorization"] == "bob" and not self.leaks:
            raise RpcError(grpc.StatusCode.NOT_FOUND, "no account")
        return types.SimpleNamespace(account=types.SimpleNamespace(owner="alice", balance_minor=1_000))

    def ListAccounts(self, request: Any, metadata: Any, timeout: float) -> Any:
        """bob's account on the first page; a leak puts alice's on a second one (the lab must read every page)."""
        if request.page_token == "page-2":
            return types.SimpleNamespace(accounts=[types.SimpleNamespace(account_id="alice")], next_page_token="")
        return types.SimpleNamespace(accounts=[types.SimpleNamespace(account_id="bob")],
                                     next_page_token="page-2" if self.leaks else "")

    def Transfer(self, request: Any, metadata: Any, timeout: float) -> Any:
        raise RpcError(grpc.StatusCode.NOT_FOUND, "no account")


def other_customer(monkeypatch: pytest.MonkeyPatch, leaks: bool = False, balances: tuple[int, int] = (1_000, 0)) -> Any:
    bank = FakeBank(balances)
    bank.accounts = bank.payments = Accounts(leaks)  # type: ignore[attr-defined]
    bank.transfer_request = lambda source, target, amount: None  # type: ignore[attr-defined]
    monkeypatch.setattr(access, "Bank", lambda session, name: bank)
    return types.SimpleNamespace(watch=lambda: Watching())


def test_another_customers_account_holds_only_when_hidden_listed_nowhere_and_untouched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert held(list(access.other_customer_account(other_customer(monkeypatch)))) == [None, True, True, True, True]
    leaked = list(access.other_customer_account(other_customer(monkeypatch, leaks=True)))
    assert held(leaked) == [None, False, False, True, True]
    assert leaked[2].observed == "2 account(s), alice's among them"
    assert held(list(access.other_customer_account(other_customer(monkeypatch, balances=(500, 0)))))[-1] is False
