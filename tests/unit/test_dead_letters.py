"""Dead letters: a refused record keeps its bytes and the reason, and one too large to be written again with its
headers is kept as a prefix with its size and digest, so its partition never stops on it."""

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import pytest

from bastion.events.consumer import (
    DEAD_LETTER_MAX_BYTES,
    DEAD_LETTER_PREFIX_BYTES,
    ConsumerSettings,
    DeadLetterError,
    DeadLetters,
    VerifyingConsumer,
    safe_claim,
    source_of,
)
from bastion.events.errors import KeyNotFoundError, RejectReason, TrustStoreUnavailableError, VerificationError
from bastion.events.v1.envelope_pb2 import Envelope, EnvelopeBundle
from bastion.events.verify import BUNDLE_CONTENT, BUNDLE_HEADER


class Record:
    def headers(self) -> list[tuple[str, bytes]]:
        return [(BUNDLE_HEADER, BUNDLE_CONTENT)]

    def value(self) -> bytes:
        return b"a bundle"

    def topic(self) -> str:
        return "accounts.events.v1"

    def partition(self) -> int:
        return 2

    def offset(self) -> int:
        return 77

    def key(self) -> bytes | None:
        return None


class Acknowledging:
    """Keeps what is produced and acknowledges it at flush."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, dict[str, bytes]]] = []
        self.callbacks: list[Any] = []

    def produce(self, topic: str, value: bytes, key: Any, headers: list[tuple[str, bytes]], on_delivery: Any) -> None:
        self.sent.append((topic, value, dict(headers)))
        self.callbacks.append(on_delivery)

    def flush(self, _timeout: float) -> int:
        for callback in self.callbacks:
            callback(None, None)
        return 0


REFUSED = VerificationError(RejectReason.MALFORMED, "not an envelope bundle")


def test_a_refused_record_keeps_its_bytes_reason_and_place() -> None:
    producer = Acknowledging()
    letters = DeadLetters(producer, "notifications")  # type: ignore[arg-type]
    letters.write(Record(), b"forged", REFUSED, item=3, bundled=True)  # type: ignore[arg-type]
    letters.settle()
    [(topic, value, headers)] = producer.sent
    assert (topic, value) == ("accounts.events.v1.dlq", b"forged")
    assert headers["bastion-reject-reason"] == b"malformed"
    assert headers["bastion-source"] == b"accounts.events.v1/2/77/3"
    assert headers[BUNDLE_HEADER] == BUNDLE_CONTENT and "bastion-truncated-from" not in headers


def test_a_record_too_large_to_dead_letter_whole_keeps_a_prefix_its_size_and_digest() -> None:
    producer = Acknowledging()
    huge = bytes(range(256)) * ((DEAD_LETTER_MAX_BYTES // 256) + 200)
    letters = DeadLetters(producer, "audit")  # type: ignore[arg-type]
    letters.write(Record(), huge, REFUSED, bundled=True)  # type: ignore[arg-type]
    letters.settle()
    [(_, value, headers)] = producer.sent
    assert value == huge[:DEAD_LETTER_PREFIX_BYTES]
    assert headers["bastion-truncated-from"] == str(len(huge)).encode()
    assert headers["bastion-sha256"] == hashlib.sha256(huge).hexdigest().encode()


def test_a_record_of_exactly_the_largest_size_is_dead_lettered_whole() -> None:
    producer = Acknowledging()
    letters = DeadLetters(producer, "audit")  # type: ignore[arg-type]
    largest = bytes(DEAD_LETTER_MAX_BYTES)
    letters.write(Record(), largest, REFUSED)  # type: ignore[arg-type]
    letters.settle()
    [(_, value, headers)] = producer.sent
    assert value == largest and "bastion-truncated-from" not in headers


def test_each_place_names_one_record_envelope_or_released_held_event() -> None:
    places = {source_of(Record(), item, released)  # type: ignore[arg-type]
              for item in (None, 0, 2) for released in (None, 0, 2)}
    assert len(places) == 9
    assert source_of(Record(), released=5) == "accounts.events.v1/2/77/released/5"  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", "a/b", "Notifications", "notifications/x", "9lives", "n" * 64, "accounts\n"])
def test_a_consumer_name_that_could_blur_a_place_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="not a service name"):
        ConsumerSettings(name, "group", ["t"])


class Unanswering(Acknowledging):
    """Takes records and never reports on them."""

    def flush(self, _timeout: float) -> int:
        return len(self.callbacks)


class RefusingOne(Acknowledging):
    """Acknowledges every record but the second."""

    def flush(self, _timeout: float) -> int:
        for number, callback in enumerate(self.callbacks):
            callback("Broker: not enough replicas" if number == 1 else None, None)
        self.callbacks = []
        return 0


class CountingFlushes(Acknowledging):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self, timeout: float) -> int:
        self.flushes += 1
        answered = super().flush(timeout)
        self.callbacks = []
        return answered


def test_the_refused_envelopes_of_a_bundle_cost_one_broker_round_trip() -> None:
    producer = CountingFlushes()
    letters = DeadLetters(producer, "audit")  # type: ignore[arg-type]
    for item in range(300):
        letters.write(Record(), b"forged", REFUSED, item=item, bundled=True)  # type: ignore[arg-type]
    letters.settle()
    assert producer.flushes == 1 and len(producer.sent) == 300
    assert {headers["bastion-source"] for _, _, headers in producer.sent} == {
        f"accounts.events.v1/2/77/{item}".encode() for item in range(300)}
    letters.settle()  # nothing written since: no round trip
    assert producer.flushes == 1


def test_one_unacknowledged_dead_letter_fails_the_whole_settle() -> None:
    letters = DeadLetters(RefusingOne(), "audit")  # type: ignore[arg-type]
    for item in range(3):
        letters.write(Record(), b"forged", REFUSED, item=item, bundled=True)  # type: ignore[arg-type]
    with pytest.raises(DeadLetterError, match=r"1 failed .*not enough replicas"):
        letters.settle()


def test_a_dead_letter_without_an_answer_from_the_broker_fails_the_settle() -> None:
    letters = DeadLetters(Unanswering(), "audit")  # type: ignore[arg-type]
    letters.write(Record(), b"forged", REFUSED)  # type: ignore[arg-type]
    with pytest.raises(DeadLetterError, match=r"1 without an answer.*first at accounts\.events\.v1/2/77"):
        letters.settle()


def test_a_late_report_counts_for_its_own_settle_not_the_next() -> None:
    producer = Unanswering()
    letters = DeadLetters(producer, "audit")  # type: ignore[arg-type]
    letters.write(Record(), b"forged", REFUSED, item=0)  # type: ignore[arg-type]
    with pytest.raises(DeadLetterError):
        letters.settle()
    late = producer.callbacks.pop()
    letters.write(Record(), b"forged", REFUSED, item=1)  # type: ignore[arg-type]
    late("Broker: timed out", None)  # the first letter's report, arriving while the second waits
    producer.callbacks.pop()(None, None)
    letters.settle()  # the second letter was acknowledged: the first's late failure is not counted against it


class BundleRecord(Record):
    def timestamp(self) -> tuple[int, int]:
        return (0, 0)


class ForgedBundle:
    """What `verify_bundle` answers for a bundle whose signature verified and whose envelopes are all refused."""

    def __init__(self, refused: int) -> None:
        one = EnvelopeBundle(envelopes=[Envelope(producer="accounts", event_id="e-1").SerializeToString()])
        self.raw = one.SerializeToString()
        self.outcomes = [VerificationError(RejectReason.NOT_AUTHORISED, f"envelope {n}: producer may not publish it")
                         for n in range(refused)]

    def verify_bundle(self, _raw: bytes, _topic: str, _received: Any) -> "ForgedBundle":
        return self

    def alone(self, _index: int) -> bytes:
        return self.raw


class CountingEngine:
    def __init__(self) -> None:
        self.transactions = 0

    @contextlib.contextmanager
    def begin(self) -> Iterator[str]:
        self.transactions += 1
        yield "connection"


class RecordingOutbox:
    def __init__(self) -> None:
        self.appended: list[tuple[str, str]] = []

    def append(self, conn: str, _topic: str, record: Any, **ids: str) -> None:
        self.appended.append((conn, ids["event_id"]))


def test_a_bundle_of_refused_envelopes_costs_one_transaction_and_one_round_trip_and_loses_none() -> None:
    consumer = VerifyingConsumer.__new__(VerifyingConsumer)  # the Kafka clients are not needed to settle a record
    producer, engine, outbox = CountingFlushes(), CountingEngine(), RecordingOutbox()
    consumer.settings = ConsumerSettings("notifications", "notifications", ["accounts.events.v1"])
    consumer.verifier, consumer.engine, consumer.security_outbox = ForgedBundle(250), engine, outbox  # type: ignore
    consumer.letters = DeadLetters(producer, "notifications")  # type: ignore[arg-type]
    assert consumer.handle(BundleRecord()) == "rejected"  # type: ignore[arg-type]
    assert (engine.transactions, producer.flushes) == (1, 1)
    assert len(producer.sent) == 250 and len({event_id for _, event_id in outbox.appended}) == 250
    assert [headers["bastion-reject-reason"] for _, _, headers in producer.sent] == [b"not_authorised"] * 250


@pytest.mark.parametrize(("claimed", "kept"), [
    ("0b6f2a4e-5d0c-4c7e-9a57-2f7d1c3e8b10", "0b6f2a4e-5d0c-4c7e-9a57-2f7d1c3e8b10"),
    ("", "-"),
    ("forged\n", "(malformed)"),  # a line break would start a log line of the attacker's
    ("x" * 101, "(malformed)"),
    ("<script>", "(malformed)"),
])
def test_what_a_refused_event_claims_is_kept_only_when_well_formed(claimed: str, kept: str) -> None:
    assert safe_claim(claimed) == kept


def test_thousands_of_refused_envelopes_are_settled_on_the_way_so_the_producer_queue_never_overflows() -> None:
    producer = CountingFlushes()
    letters = DeadLetters(producer, "audit", max_unsettled=1000)  # type: ignore[arg-type]
    for item in range(2500):
        letters.write(Record(), b"forged", REFUSED, item=item, bundled=True)  # type: ignore[arg-type]
    assert producer.flushes == 2, "waited after the first and the second thousand"
    letters.settle()
    assert producer.flushes == 3 and len(producer.sent) == 2500


def test_no_more_than_the_most_letters_wait_unsettled_in_the_producer() -> None:
    producer = CountingFlushes()
    letters = DeadLetters(producer, "audit", max_unsettled=2)  # type: ignore[arg-type]
    for item in range(2):
        letters.write(Record(), b"forged", REFUSED, item=item)  # type: ignore[arg-type]
    assert producer.flushes == 0
    letters.write(Record(), b"forged", REFUSED, item=2)  # type: ignore[arg-type]
    assert producer.flushes == 1 and len(producer.sent) == 3


class FullQueue(Acknowledging):
    """A producer whose queue is full for the first FULL attempts."""

    def __init__(self, full: int) -> None:
        super().__init__()
        self.full = full
        self.polls = 0

    def produce(self, *args: Any, **kwargs: Any) -> None:
        if self.full > 0:
            self.full -= 1
            raise BufferError("Local: Queue full")
        super().produce(*args, **kwargs)

    def poll(self, _timeout: float) -> int:
        self.polls += 1
        return 0


def test_a_full_producer_queue_is_waited_out_and_a_queue_that_stays_full_fails_the_write() -> None:
    draining = FullQueue(full=3)
    letters = DeadLetters(draining, "audit")  # type: ignore[arg-type]
    letters.write(Record(), b"forged", REFUSED)  # type: ignore[arg-type]
    letters.settle()
    assert (draining.polls, len(draining.sent)) == (3, 1)
    stuck = DeadLetters(FullQueue(full=10**6), "audit")  # type: ignore[arg-type]
    with pytest.raises(DeadLetterError, match="queue stayed full"):
        stuck.write(Record(), b"forged", REFUSED)  # type: ignore[arg-type]


def test_a_released_held_event_is_dead_lettered_before_the_transaction_that_sets_it_aside_commits() -> None:
    """`_set_aside_held` passes its own transaction: the dead letter must be acknowledged before `_reject`
    returns, since that transaction commits the held row's removal right after."""
    consumer = VerifyingConsumer.__new__(VerifyingConsumer)
    producer, outbox = CountingFlushes(), RecordingOutbox()
    consumer.settings = ConsumerSettings("notifications", "notifications", ["accounts.events.v1"])
    consumer.engine, consumer.security_outbox = CountingEngine(), outbox  # type: ignore[assignment]
    consumer.letters = DeadLetters(producer, "notifications")  # type: ignore[arg-type]
    consumer._reject(BundleRecord(), ForgedBundle(1).raw, REFUSED, item=0, bundled=True, released=4,  # type: ignore
                     conn="the caller's transaction")  # type: ignore[arg-type]
    assert producer.flushes == 1 and len(producer.sent) == 1
    assert outbox.appended[0][0] == "the caller's transaction"
    assert producer.sent[0][2]["bastion-source"] == b"accounts.events.v1/2/77/0/released/4"


@pytest.mark.parametrize("failure", [TrustStoreUnavailableError("the trust store cannot be read: JSONDecodeError"),
                                     KeyNotFoundError("private key of 'accounts/20261127-0a0b0c0d' is missing")])
def test_keys_that_cannot_be_read_stop_the_consumer_and_never_set_the_event_aside(failure: Exception) -> None:
    """Not the event's fault: no handler retries, no dead letter; the record is read again after the restart."""
    consumer = VerifyingConsumer.__new__(VerifyingConsumer)
    producer = CountingFlushes()
    consumer.settings = ConsumerSettings("notifications", "notifications", ["accounts.events.v1"])
    consumer.engine, consumer.security_outbox = CountingEngine(), RecordingOutbox()  # type: ignore[assignment]
    consumer.letters = DeadLetters(producer, "notifications")  # type: ignore[arg-type]

    def keys_unreadable(*_args: Any) -> str:
        raise failure

    consumer._apply_in_order = keys_unreadable  # type: ignore[method-assign]
    with pytest.raises(type(failure)):
        consumer._settle(BundleRecord(), None, b"raw")  # type: ignore[arg-type]
    assert producer.sent == [] and consumer.engine.transactions == 1  # type: ignore[attr-defined]
