"""The audit service's consumer loop: a consumed batch's refused records are dead-lettered and acknowledged
before the batch is appended and its offsets committed, so a refused record is never lost to a crash; the alerts
the batch raises are written in the transaction that appends it; a checkpoint file it cannot believe stops the
signing, never the log; checkpoints a key retired too early left unanchored are covered by the new key; a key
retired a moment ago is waited out, not a reason to stop signing. Also: each envelope of a bundle is its own record
(kept as it verifies alone), a bundle refused whole is one; the Kafka clients' settings; a checkpoint published
keyed by its log."""

import contextlib
import datetime as dt
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from confluent_kafka import TIMESTAMP_LOG_APPEND_TIME, KafkaError
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from bastion.access.v1.decision_pb2 import EventRejected
from bastion.accounts.v1.events_pb2 import AccountOpened
from bastion.audit.chain import Head
from bastion.audit.checkpoints import Checkpointer, CheckpointFile, sign_checkpoint
from bastion.audit.errors import CheckpointError
from bastion.events.consumer import DeadLetters
from bastion.events.envelopes import bundle
from bastion.events.errors import RejectReason, TrustStoreUnavailableError, VerificationError
from bastion.events.keys import KeyRing
from bastion.events.v1.envelope_pb2 import Envelope
from bastion.events.verify import VerifiedEvent
from bastion.grpc.spans import SpanRecorder
from services.audit.adapters import kafka as kafka_adapter
from services.audit.adapters.kafka import AuditConsumer, AuditRecords, CheckpointPublisher
from tests.unit.audit.samples import AUDIT_KEY


class Forged:
    def __init__(self, offset: int) -> None:
        self._offset = offset

    def error(self) -> None:
        return None

    def headers(self) -> list[tuple[str, bytes]]:
        return []

    def value(self) -> bytes:
        return b"\x0a\x03abc"

    def topic(self) -> str:
        return "accounts.events.v1"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def key(self) -> None:
        return None

    def timestamp(self) -> tuple[int, int]:
        return (0, 0)


class Refusing:
    def verify(self, *_args: Any) -> None:
        raise VerificationError(RejectReason.BAD_SIGNATURE, "signature does not verify")


class Kafka:
    def __init__(self, steps: list[str]) -> None:
        self.steps = steps

    def consume(self, _count: int, _timeout: float) -> list[Forged]:
        return [Forged(7), Forged(8)]

    def commit(self, asynchronous: bool) -> None:
        self.steps.append("commit")

    def produce(self, topic: str, value: bytes, key: Any, headers: Any, on_delivery: Any) -> None:
        self.steps.append(f"dead letter {dict(headers)['bastion-source'].decode()}")
        self.pending = [*getattr(self, "pending", []), on_delivery]

    def flush(self, _timeout: float) -> int:
        self.steps.append("acknowledged")
        for report in self.pending:
            report(None, None)
        self.pending = []
        return 0


class Store:
    def __init__(self, steps: list[str]) -> None:
        self.steps = steps

    @contextlib.contextmanager
    def begin(self) -> Iterator[str]:
        yield "connection"
        self.steps.append("transaction committed")

    def append(self, _conn: str, records: list[Any]) -> list[str]:
        self.steps.append(f"appended {len(records)}")
        return [f"placed {index}" for index in range(len(records))]


class Alerts:
    def __init__(self, steps: list[str]) -> None:
        self.steps = steps

    def observe(self, conn: str, placed: list[str]) -> list[Any]:
        self.steps.append(f"alerts of {len(placed)} entries in the {conn}'s transaction")
        return []


def test_a_batchs_refused_records_are_acknowledged_as_dead_letters_before_anything_is_committed() -> None:
    steps: list[str] = []
    kafka, store = Kafka(steps), Store(steps)
    consumer = AuditConsumer.__new__(AuditConsumer)  # the Kafka clients and the checkpointer are not needed here
    consumer.consumer, consumer.engine, consumer.store = kafka, store, store  # type: ignore[assignment]
    consumer.letters = DeadLetters(kafka, "audit")  # type: ignore[arg-type]
    consumer.records = AuditRecords(Refusing(), consumer.letters)  # type: ignore[arg-type]
    consumer.alerts = Alerts(steps)  # type: ignore[assignment]
    consumer.signing_refused = True  # no checkpoint in this test
    consumer.batch_size, consumer.poll_seconds, consumer.spans = 500, 0.1, None
    assert consumer.poll_batch() == 2
    assert steps == ["dead letter accounts.events.v1/0/7", "dead letter accounts.events.v1/0/8", "acknowledged",
                     "appended 2", "alerts of 2 entries in the connection's transaction", "transaction committed",
                     "commit"]


TRACE, CALLER_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


class Accepting:
    """Verifies every record as an event (ev-7, ev-8, ...); every second one carries a sampled trace context."""

    def verify(self, _raw: bytes, topic: str, _received: Any) -> VerifiedEvent:
        self.count = getattr(self, "count", 6) + 1
        envelope = Envelope(event_id=f"ev-{self.count}", event_type="bastion.accounts.v1.AccountOpened", topic=topic,
                            producer="accounts", aggregate_id="a1", correlation_id="corr-1")
        if self.count % 2 == 0:
            envelope.traceparent = f"00-{TRACE}-{CALLER_SPAN}-01"
        return VerifiedEvent(envelope, AccountOpened(account_id="a1"))


class FailingStore(Store):
    def append(self, _conn: str, records: list[Any]) -> list[str]:
        raise OSError("the database went away")


class CommitFailing(Kafka):
    def commit(self, asynchronous: bool) -> None:
        raise OSError("the group coordinator went away")


def test_each_traced_event_the_log_takes_leaves_a_consumer_span_once_its_batch_is_appended() -> None:
    steps: list[str] = []
    exported = InMemorySpanExporter()
    kafka, store = Kafka(steps), FailingStore(steps)
    consumer = AuditConsumer.__new__(AuditConsumer)  # the Kafka clients and the checkpointer are not needed here
    consumer.consumer, consumer.engine, consumer.store = kafka, store, store  # type: ignore[assignment]
    consumer.letters = DeadLetters(kafka, "audit")  # type: ignore[arg-type]
    consumer.records = AuditRecords(Accepting(), consumer.letters)  # type: ignore[arg-type]
    consumer.alerts, consumer.signing_refused = None, True
    consumer.batch_size, consumer.poll_seconds = 500, 0.1
    consumer.spans = SpanRecorder("audit", processor=SimpleSpanProcessor(exported))
    with pytest.raises(OSError):
        consumer.poll_batch()
    assert exported.get_finished_spans() == (), "a batch the log did not take leaves no span"
    consumer.store, consumer.consumer = Store(steps), CommitFailing(steps)  # type: ignore[assignment]
    with pytest.raises(OSError):
        consumer.poll_batch()
    assert exported.get_finished_spans() == (), "nor one whose offsets were not committed: it is read again"
    consumer.consumer = kafka  # type: ignore[assignment]
    before = time.time_ns()
    assert consumer.poll_batch() == 2
    [span] = exported.get_finished_spans()  # the failed batches' traced events (ev-8, ev-10) are not carried over
    assert span.name == "process accounts.events.v1" and span.kind is SpanKind.CONSUMER
    assert dict(span.attributes or {})["bastion.event_id"] == "ev-12"
    assert f"{span.parent.span_id:016x}" == CALLER_SPAN and f"{span.context.trace_id:032x}" == TRACE  # type: ignore[union-attr]
    assert before <= span.start_time <= span.end_time <= time.time_ns()  # type: ignore[operator]


class KeysUnreadable:
    def verify(self, *_args: Any) -> None:
        raise TrustStoreUnavailableError("the trust store cannot be read: JSONDecodeError")


def test_a_record_is_never_judged_while_the_trust_store_cannot_be_read() -> None:
    """No verdict, not even "not recordable": the consumer stops before committing and reads it again later."""
    letters = DeadLetters(Kafka([]), "audit")  # type: ignore[arg-type]
    with pytest.raises(TrustStoreUnavailableError):
        AuditRecords(KeysUnreadable(), letters).record(Forged(9))  # type: ignore[arg-type]


class SecurityRecords:
    def __init__(self) -> None:
        self.refused: list[tuple[str, str]] = []

    def checkpoint_refused(self, error: CheckpointError, where: str) -> None:
        self.refused.append((type(error).__name__, where))


class Engine:
    """The audit database as the checkpointing part of the consumer reads it: the log's head."""

    @contextlib.contextmanager
    def connect(self) -> Iterator[str]:
        yield "connection"


class Log:
    """A log of HEAD whose record at each length has the hash HASHES says (else one derived from the length)."""

    def __init__(self, head: Head, hashes: dict[int, bytes] | None = None) -> None:
        self.at = head
        self.hashes = {**(hashes or {}), head.length: head.hash}

    def head(self, _conn: str) -> Head:
        return self.at

    def hash_at(self, _conn: str, length: int) -> bytes | None:
        if length > self.at.length:
            return None
        return self.hashes.get(length, bytes([length]) * 32)


class Publisher:
    def __init__(self) -> None:
        self.published: list[Any] = []

    def publish(self, checkpoint: Any) -> None:
        self.published.append(checkpoint)


def checkpointing(checkpointer: Checkpointer, head: Head, hashes: dict[int, bytes] | None = None) -> AuditConsumer:
    consumer = AuditConsumer.__new__(AuditConsumer)  # only the checkpointing part is needed here
    consumer.checkpointer, consumer.engine = checkpointer, Engine()  # type: ignore[assignment]
    consumer.store = Log(head, hashes)  # type: ignore[assignment]
    consumer.security, consumer.publisher = SecurityRecords(), Publisher()  # type: ignore[assignment]
    consumer.signing_refused = consumer.key_in_flux = False
    return consumer


def test_a_checkpoint_file_it_cannot_believe_stops_the_signing_with_a_security_record(
    ring: KeyRing, tmp_path: Path
) -> None:
    """A forged line in the file: the service signs nothing over it and says so; it does not crash its consumer
    loop, and the log goes on taking records."""
    genuine = sign_checkpoint(ring.signing_key("audit"), "origin", Head(3, b"\x03" * 32))
    forged = replace(genuine, head_hash=b"\x04" * 32)
    path = tmp_path / "checkpoints.jsonl"
    path.write_text(forged.to_json() + "\n")
    consumer = checkpointing(Checkpointer(ring.followed_signing_key("audit"),
                                          CheckpointFile(path, ring.trust_store(), "origin", unanchored_ok=True)),
                             Head(4, b"\x04" * 32))
    consumer._checkpoint_if_due()
    consumer._checkpoint_if_due()
    assert consumer.signing_refused
    assert consumer.security.refused == [("BadCheckpointSignatureError", "checkpointer")]  # type: ignore[attr-defined]
    assert len(path.read_text().splitlines()) == 1, "nothing signed over the unbelieved checkpoint"


@pytest.mark.parametrize("line", [
    b'{"origin":"origin","length":3,"head_hash":"' + b"03" * 32 + b'","key_id":"k","signature":"\xc3\xa9"}\n',
    b"\xff\n",  # not UTF-8
], ids=["base64 outside ascii", "not utf-8"])
def test_a_checkpoint_file_that_does_not_even_parse_stops_the_signing_not_the_consumer(
    ring: KeyRing, tmp_path: Path, line: bytes
) -> None:
    """Refused like a forged line: anything but a CheckpointError would fail every batch after its append, before
    its offsets are committed, so the consumer would read the same batch again for ever and the log take nothing
    more."""
    path = tmp_path / "checkpoints.jsonl"
    path.write_bytes(line)
    consumer = checkpointing(Checkpointer(ring.followed_signing_key("audit"),
                                          CheckpointFile(path, ring.trust_store(), "origin", unanchored_ok=True)),
                             Head(4, b"\x04" * 32))
    consumer._checkpoint_if_due()
    assert consumer.signing_refused
    assert consumer.security.refused == [("MalformedCheckpointError", "checkpointer")]  # type: ignore[attr-defined]
    assert path.read_bytes() == line, "nothing signed over it"


def test_what_a_key_retired_too_early_left_unanchored_is_covered_by_the_new_key(ring: KeyRing, tmp_path: Path
                                                                               ) -> None:
    old = ring.signing_key("audit")
    path = tmp_path / "checkpoints.jsonl"
    path.write_text(sign_checkpoint(old, "origin", Head(3, b"\x03" * 32)).to_json() + "\n")
    ring.rotate("audit")
    ring.retire("audit", old.key_id)  # with --force, the service not yet signed with its new key
    consumer = checkpointing(Checkpointer(ring.followed_signing_key("audit"),
                                          CheckpointFile(path, ring.trust_store(), "origin", unanchored_ok=True),
                                          every_records=1000, every_seconds=3600), Head(5, b"\x05" * 32))
    consumer._checkpoint_if_due()
    [anchor] = consumer.publisher.published  # type: ignore[attr-defined]
    assert anchor.key_id == ring.signing_key("audit").key_id and anchor.length == 5 and not consumer.signing_refused
    assert CheckpointFile(path, ring.trust_store(), "origin").load() == [anchor], "the log verifies again"


@pytest.mark.parametrize(("head", "hashes", "error"), [
    (Head(5, b"\x05" * 32), {3: b"\x99" * 32}, "CheckpointForkError"),  # rewritten while the service was down
    (Head(2, b"\x02" * 32), {}, "CheckpointRollbackError"),  # restored from an older copy
], ids=["rewritten", "shorter"])
def test_what_a_key_retired_too_early_left_unanchored_is_never_covered_over_a_log_that_no_longer_matches_it(
    ring: KeyRing, tmp_path: Path, head: Head, hashes: dict[int, bytes], error: str
) -> None:
    """Not believed, still checked: the new key does not sign over a log that no longer extends the retired key's
    newest checkpoint, and says why."""
    old = ring.signing_key("audit")
    path = tmp_path / "checkpoints.jsonl"
    path.write_text(sign_checkpoint(old, "origin", Head(3, b"\x03" * 32)).to_json() + "\n")
    ring.rotate("audit")
    ring.retire("audit", old.key_id)
    consumer = checkpointing(Checkpointer(ring.followed_signing_key("audit"),
                                          CheckpointFile(path, ring.trust_store(), "origin", unanchored_ok=True)),
                             head, hashes)
    consumer._checkpoint_if_due()
    assert consumer.signing_refused and consumer.security.refused == [(error, "checkpointer")]  # type: ignore[attr-defined]
    assert consumer.publisher.published == [] and len(path.read_text().splitlines()) == 1  # type: ignore[attr-defined]


def test_signing_with_a_key_just_retired_waits_for_the_new_key_instead_of_stopping(ring: KeyRing, tmp_path: Path
                                                                                  ) -> None:
    old = ring.signing_key("audit")
    ring.rotate("audit")
    ring.retire("audit", old.key_id)
    consumer = checkpointing(Checkpointer(old, CheckpointFile(tmp_path / "checkpoints.jsonl", ring.trust_store(),
                                                              "origin", unanchored_ok=True), every_records=1),
                             Head(2, b"\x02" * 32))
    with capture_logs() as logs:
        for _ in range(3):  # polls until the service's next look at the key ring
            consumer._checkpoint_if_due()
    assert consumer.key_in_flux and not consumer.signing_refused
    assert [line["event"] for line in logs] == ["checkpoint_key_not_trusted"], "said once, not on every poll"
    assert consumer.security.refused == [] and consumer.publisher.published == []  # type: ignore[attr-defined]
    consumer.checkpointer.key = ring.followed_signing_key("audit")  # its next look at the key ring
    consumer._checkpoint_if_due()
    assert not consumer.key_in_flux and len(consumer.publisher.published) == 1  # type: ignore[attr-defined]


BROKER_TIME = dt.datetime(2026, 3, 1, 9, 0, tzinfo=dt.UTC)
CLOCK = dt.datetime(2026, 3, 1, 9, 0, 5, tzinfo=dt.UTC)


class Record(Forged):
    """A record of the audited topics with what it holds, its headers, and the broker's append time."""

    def __init__(self, offset: int, value: bytes, headers: list[tuple[str, bytes]] | None = None) -> None:
        super().__init__(offset)
        self._value, self._headers = value, headers or []

    def headers(self) -> list[tuple[str, bytes]]:
        return self._headers

    def value(self) -> bytes:
        return self._value

    def timestamp(self) -> tuple[int, int]:
        return (TIMESTAMP_LOG_APPEND_TIME, int(BROKER_TIME.timestamp() * 1000))


class Letters(Kafka):
    """The dead-letter producer: keeps each letter's source, headers and bytes."""

    def __init__(self) -> None:
        super().__init__([])
        self.letters: list[tuple[str, dict[str, bytes], bytes]] = []

    def produce(self, topic: str, value: bytes, key: Any, headers: Any, on_delivery: Any) -> None:
        super().produce(topic, value, key, headers, on_delivery)
        self.letters.append((dict(headers)["bastion-source"].decode(), dict(headers), value))


def envelope(event_id: str, traced: bool = False, occurred: dt.datetime = BROKER_TIME) -> Envelope:
    sealed = Envelope(event_id=event_id, event_type="bastion.accounts.v1.AccountOpened", topic="accounts.events.v1",
                      producer="accounts", aggregate_id="a1", correlation_id=f"corr-{event_id}")
    sealed.occurred_at.FromDatetime(occurred)
    if traced:
        sealed.traceparent = f"00-{TRACE}-{CALLER_SPAN}-01"
    return sealed


class Bundles:
    """A bundle's verdict: refused whole (REFUSAL), or the outcome of each envelope; envelope I alone is `alone-I`."""

    def __init__(self, outcomes: list[Any], refusal: VerificationError | None = None) -> None:
        self.outcomes, self.refusal = outcomes, refusal

    def verify_bundle(self, _raw: bytes, _topic: str, _received: Any) -> Any:
        if self.refusal is not None:
            raise self.refusal
        return SimpleNamespace(outcomes=self.outcomes, alone=lambda item: f"alone-{item}".encode())

    def verify(self, raw: bytes, _topic: str, _received: Any) -> VerifiedEvent:
        if raw == b"refused":
            raise VerificationError(RejectReason.BAD_SIGNATURE, "signature does not verify")
        return self.outcomes[0]


BUNDLED = [("bastion-content", b"bundle-v1")]


def applied(topic: str = "accounts.events.v1") -> float:
    return REGISTRY.get_sample_value("bastion_events_applied_total", {"consumer": "audit", "topic": topic}) or 0.0


def test_each_envelope_of_a_bundle_is_its_own_record_kept_as_it_verifies_alone() -> None:
    out_of_range = envelope("ev-3")
    out_of_range.occurred_at.seconds = 2**62  # verified, yet no audit record can hold its time
    verdicts = Bundles([VerifiedEvent(envelope("ev-1", traced=True), AccountOpened(account_id="a1")),
                        VerificationError(RejectReason.STALE, "published long ago"),
                        VerifiedEvent(out_of_range, AccountOpened(account_id="a1"))])
    kafka = Letters()
    records = AuditRecords(verdicts, DeadLetters(kafka, "audit"), lambda: CLOCK)  # type: ignore[arg-type]
    before = applied()
    accepted, stale, unrecordable = records.of(Record(5, b"the bundle", BUNDLED))  # type: ignore[arg-type]
    assert (accepted.kind.value, accepted.item, accepted.envelope, accepted.event_id) == (
        "event", 0, b"alone-0", "ev-1")
    assert (stale.kind.value, stale.item, stale.envelope, stale.reason) == ("rejection", 1, b"alone-1", "stale")
    assert (stale.action, stale.occurred_at, stale.recorded_at) == ("accounts.events.v1/0/5/1", BROKER_TIME, CLOCK)
    assert (unrecordable.item, unrecordable.reason) == (2, "malformed")
    assert (unrecordable.detail or "").startswith("not recordable: ")
    assert [(source, value, headers.get("bastion-content")) for source, headers, value in kafka.letters] == [
        ("accounts.events.v1/0/5/1", b"alone-1", b"bundle-v1"), ("accounts.events.v1/0/5/2", b"alone-2", b"bundle-v1")]
    assert [traced.event_id for traced in records.traced] == ["ev-1"]
    assert applied() == before + 1


def test_a_bundle_refused_whole_is_one_refused_record_that_names_what_its_first_envelope_claims() -> None:
    first, second = envelope("ev-1"), envelope("ev-2")
    first.producer = second.producer = "audit"  # the test key's
    raw = bundle([first.SerializeToString(), second.SerializeToString()], AUDIT_KEY).SerializeToString()
    kafka = Letters()
    records = AuditRecords(Bundles([], VerificationError(RejectReason.BAD_SIGNATURE, "bad")),  # type: ignore[arg-type]
                           DeadLetters(kafka, "audit"), lambda: CLOCK)
    [refused] = records.of(Record(6, raw, BUNDLED))  # type: ignore[arg-type]
    assert (refused.item, refused.event_id, refused.producer, refused.envelope) == (None, "ev-1", "audit", raw)
    assert (refused.action, refused.occurred_at) == ("accounts.events.v1/0/6", BROKER_TIME)
    [(source, headers, value)] = kafka.letters
    assert (source, value, headers.get("bastion-content")) == ("accounts.events.v1/0/6", raw, b"bundle-v1")


def test_a_record_alone_is_judged_at_the_brokers_time_and_only_a_traced_event_is_noted_for_its_span() -> None:
    class Clocked(Bundles):
        def verify(self, raw: bytes, topic: str, received: Any) -> VerifiedEvent:
            self.received = received
            return super().verify(raw, topic, received)

    plain = Clocked([VerifiedEvent(envelope("ev-1"), AccountOpened(account_id="a1"))])
    records = AuditRecords(plain, DeadLetters(Letters(), "audit"), lambda: CLOCK)  # type: ignore[arg-type]
    [record] = records.of(Record(7, b"one event"))  # type: ignore[arg-type]
    assert (record.item, record.recorded_at, plain.received, records.traced) == (None, CLOCK, BROKER_TIME, [])
    [refused] = records.of(Record(8, b"refused"))  # type: ignore[arg-type]
    assert refused.occurred_at == BROKER_TIME and refused.reason == "bad_signature"


def test_an_event_alone_that_no_audit_record_can_hold_is_kept_as_refused() -> None:
    out_of_range = envelope("ev-1")
    out_of_range.occurred_at.seconds = 2**62
    kafka = Letters()
    records = AuditRecords(Bundles([VerifiedEvent(out_of_range, AccountOpened(account_id="a1"))]),  # type: ignore[arg-type]
                           DeadLetters(kafka, "audit"), lambda: CLOCK)
    [refused] = records.of(Record(9, b"one event"))  # type: ignore[arg-type]
    assert refused.reason == "malformed" and (refused.detail or "").startswith("not recordable: ")
    assert [source for source, _, _ in kafka.letters] == ["accounts.events.v1/0/9"]


class Client:
    """A Kafka client as the audit service makes one: its configuration, what it was asked to do."""

    made: ClassVar[list["Client"]] = []

    def __init__(self, config: dict[str, Any]) -> None:
        self.config, self.subscribed, self.produced = config, [], []  # type: ignore[var-annotated]
        self.reports: list[Any] = [None]
        Client.made.append(self)

    def subscribe(self, topics: list[str]) -> None:
        self.subscribed = topics

    def produce(self, topic: str, value: bytes, key: bytes, on_delivery: Any) -> None:
        self.produced.append((topic, value, key))
        self.on_delivery = on_delivery

    def flush(self, _timeout: float) -> int:
        for report in self.reports:  # ... is a delivery never reported
            if report is not ...:
                self.on_delivery(report, None)
        return 0


class Starting:
    def __init__(self) -> None:
        self.started: list[tuple[str, int, dt.datetime]] = []

    def start(self, conn: str, head: int, now: dt.datetime) -> list[Any]:
        self.started.append((conn, head, now))
        return []


def test_the_consumer_reads_only_committed_records_commits_by_hand_and_starts_its_alerts_at_the_head(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kafka_adapter, "Consumer", Client)
    monkeypatch.setattr(kafka_adapter, "Producer", Client)
    Client.made = []
    alerts, store = Starting(), Store([])
    AuditConsumer({"bootstrap.servers": "kafka:9093"}, ["accounts.events.v1"], None, store,  # type: ignore[arg-type]
                  Log(Head(7, b"\x07" * 32)), None, None, None, alerts, clock=lambda: CLOCK)  # type: ignore[arg-type]
    consumer, dead_letters = Client.made
    assert consumer.config == {"bootstrap.servers": "kafka:9093", "group.id": "audit", "enable.auto.commit": False,
                               "auto.offset.reset": "earliest", "isolation.level": "read_committed"}
    assert consumer.subscribed == ["accounts.events.v1"]
    assert dead_letters.config == {"bootstrap.servers": "kafka:9093", "enable.idempotence": True, "acks": "all"}
    assert alerts.started == [("connection", 7, CLOCK)]


def test_a_checkpoint_is_published_keyed_by_its_log_and_a_failed_publication_is_said(
    monkeypatch: pytest.MonkeyPatch, ring: KeyRing
) -> None:
    monkeypatch.setattr(kafka_adapter, "Producer", Client)
    publisher = CheckpointPublisher({"bootstrap.servers": "kafka:9093"})
    producer: Client = publisher.producer  # type: ignore[assignment]
    assert producer.config == {"bootstrap.servers": "kafka:9093", "enable.idempotence": True, "acks": "all"}
    checkpoint = sign_checkpoint(ring.signing_key("audit"), "origin", Head(3, b"\x03" * 32))
    said = []
    for reports in ([None], ["broker down"], [...]):  # acknowledged, failed, never answered
        producer.reports = reports
        with capture_logs() as logs:
            publisher.publish(checkpoint)
        said.append([line["event"] for line in logs])
    assert producer.produced == [("audit.checkpoints.v1", checkpoint.to_bytes(), b"origin")] * 3
    assert said == [[], ["checkpoint_not_published"], ["checkpoint_not_published"]]


class Quiet(Kafka):
    def consume(self, _count: int, _timeout: float) -> list[Forged]:
        return []


class Erring(Forged):
    def __init__(self, offset: int, code: int) -> None:
        super().__init__(offset)
        self.code = code

    def error(self) -> Any:
        return SimpleNamespace(code=lambda: self.code, str=lambda: "broker error")


def polling(kafka: Kafka, steps: list[str]) -> AuditConsumer:
    consumer = AuditConsumer.__new__(AuditConsumer)  # the Kafka clients and the checkpointer are not needed here
    consumer.consumer, consumer.engine, consumer.store = kafka, Store(steps), Store(steps)  # type: ignore[assignment]
    consumer.letters = DeadLetters(kafka, "audit")  # type: ignore[arg-type]
    consumer.records = AuditRecords(Accepting(), consumer.letters)  # type: ignore[arg-type]
    consumer.alerts, consumer.signing_refused, consumer.spans = None, True, None
    consumer.batch_size, consumer.poll_seconds = 500, 0.1
    return consumer


def test_a_poll_that_brought_nothing_commits_nothing_and_an_error_from_the_broker_is_no_record() -> None:
    steps: list[str] = []
    assert polling(Quiet(steps), steps).poll_batch() == 0
    assert steps == []

    class Errors(Kafka):
        def consume(self, _count: int, _timeout: float) -> list[Forged]:
            return [Erring(1, KafkaError._PARTITION_EOF), Erring(2, KafkaError._TRANSPORT), Forged(3)]

    with capture_logs() as logs:
        assert polling(Errors(steps), steps).poll_batch() == 1
    assert steps == ["appended 1", "transaction committed", "commit"]
    assert [line["event"] for line in logs] == ["consumer_error"], "the end of a partition is no error"


def test_offsets_are_committed_synchronously_and_a_span_ends_when_its_batch_was_appended() -> None:
    steps: list[str] = []
    exported = InMemorySpanExporter()

    class Slow(Kafka):
        def commit(self, asynchronous: bool) -> None:
            self.asked_at = time.time_ns()
            self.asynchronous = asynchronous
            time.sleep(0.05)

    kafka = Slow(steps)
    consumer = polling(kafka, steps)
    consumer.spans = SpanRecorder("audit", processor=SimpleSpanProcessor(exported))
    consumer.poll_batch()
    [span] = exported.get_finished_spans()
    assert kafka.asynchronous is False
    assert span.end_time <= kafka.asked_at  # type: ignore[operator]


def test_a_line_of_a_retired_key_is_never_covered_over_a_log_that_no_longer_extends_the_trusted_one_before_it(
    ring: KeyRing, tmp_path: Path
) -> None:
    """A key retired because it leaked signs a rewritten history at the end of the file: the log the tamperer
    made matches that line, but not the trusted checkpoint before it, and the new key must not vouch for it."""
    trusted = ring.signing_key("audit")
    path = tmp_path / "checkpoints.jsonl"
    path.write_text(sign_checkpoint(trusted, "origin", Head(3, b"\xaa" * 32)).to_json() + "\n")
    ring.rotate("audit")
    leaked = ring.signing_key("audit")
    with path.open("a") as lines:
        lines.write(sign_checkpoint(leaked, "origin", Head(5, b"\x05" * 32)).to_json() + "\n")
    ring.rotate("audit")
    ring.retire("audit", leaked.key_id)
    consumer = checkpointing(Checkpointer(ring.followed_signing_key("audit"),
                                          CheckpointFile(path, ring.trust_store(), "origin", unanchored_ok=True)),
                             Head(6, b"\x06" * 32))  # its hash at 5 is the leaked line's, at 3 not the trusted one's
    consumer._checkpoint_if_due()
    assert consumer.signing_refused
    assert consumer.security.refused == [("CheckpointForkError", "checkpointer")]  # type: ignore[attr-defined]
    assert consumer.publisher.published == [] and len(path.read_text().splitlines()) == 2  # type: ignore[attr-defined]


def test_a_refusal_reported_in_another_consumers_name_is_kept_refused_and_dead_lettered_alone_or_bundled() -> None:
    forged = envelope("ev-9")
    forged.producer, forged.event_type = "payments", "bastion.access.v1.EventRejected"
    in_its_name = EventRejected(consumer="notifications", topic="accounts.events.v1", reason="sequence_gap")
    kafka = Letters()
    records = AuditRecords(Bundles([VerifiedEvent(forged, in_its_name)] * 2),  # type: ignore[arg-type]
                           DeadLetters(kafka, "audit"), lambda: CLOCK)
    [alone] = records.of(Record(10, b"one report"))  # type: ignore[arg-type]
    bundled, _ = records.of(Record(11, b"a bundle", BUNDLED))  # type: ignore[arg-type]
    for refused in (alone, bundled):
        assert (refused.kind.value, refused.reason, refused.principal) == ("rejection", "not_authorised", "audit")
        assert "payments reported a refusal in the name of 'notifications'" in (refused.detail or "")
    assert [source for source, _, _ in kafka.letters] == [
        "accounts.events.v1/0/10", "accounts.events.v1/0/11/0", "accounts.events.v1/0/11/1"]
