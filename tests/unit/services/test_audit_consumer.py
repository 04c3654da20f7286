"""The audit service's consumer loop: a consumed batch's refused records are dead-lettered and acknowledged
before the batch is appended and its offsets committed, so a refused record is never lost to a crash; the alerts
the batch raises are written in the transaction that appends it; a checkpoint file it cannot believe stops the
signing, never the log; checkpoints a key retired too early left unanchored are covered by the new key; a key
retired a moment ago is waited out, not a reason to stop signing."""

import contextlib
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from structlog.testing import capture_logs

from bastion.accounts.v1.events_pb2 import AccountOpened
from bastion.audit.chain import Head
from bastion.audit.checkpoints import Checkpointer, CheckpointFile, sign_checkpoint
from bastion.audit.errors import CheckpointError
from bastion.events.consumer import DeadLetters
from bastion.events.errors import RejectReason, TrustStoreUnavailableError, VerificationError
from bastion.events.keys import KeyRing
from bastion.events.v1.envelope_pb2 import Envelope
from bastion.events.verify import VerifiedEvent
from bastion.grpc.spans import SpanRecorder
from services.audit.adapters.kafka import AuditConsumer, AuditRecords


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
