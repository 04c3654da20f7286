"""The access-audit publisher signs what queued up as one bundle, one Kafka record: every decision still leaves,
in order, each verifiable on its own once taken out of its bundle; a batch that cannot be built or sent is
counted as lost and the publisher keeps going, the next batch in a fresh aggregate."""

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from prometheus_client import REGISTRY

from bastion.access.v1.decision_pb2 import DECISION_ALLOW, DECISION_DENY, AccessDecision
from bastion.events.keys import KeyRing
from bastion.events.signing import SignatureChecker, bundles_of_one, sign_bundle
from bastion.events.v1.envelope_pb2 import Envelope, EnvelopeBundle
from bastion.events.verify import BUNDLE_CONTENT, BUNDLE_HEADER
from bastion.grpc import audit as audit_module
from bastion.grpc.audit import DECISION_TYPE, TOPIC, KafkaAccessAudit, decision

SERVICE = "accounts"


class HeldProducer:
    """Stands in for librdkafka's producer: keeps what is produced; the first produce waits for RELEASE."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes, bytes]] = []
        self.release = threading.Event()
        self.holding = threading.Event()

    def produce(self, topic: str, value: bytes, key: bytes, headers: Any = None, on_delivery: Any = None) -> None:
        assert headers == [(BUNDLE_HEADER, BUNDLE_CONTENT)]
        if not self.records:
            self.holding.set()
            assert self.release.wait(10)
        self.records.append((topic, value, key))

    def envelopes(self) -> list[Envelope]:
        """Every decision's envelope, taken out of the bundles in order."""
        return [Envelope.FromString(member) for _, value, _ in self.records
                for member in EnvelopeBundle.FromString(value).envelopes]

    def correlation_ids(self) -> list[str]:
        return [AccessDecision.FromString(envelope.payload).correlation_id for envelope in self.envelopes()]

    def poll(self, _timeout: float) -> int:
        return 0

    def flush(self, _timeout: float) -> int:
        return 0


@pytest.fixture
def ring(tmp_path: Path) -> KeyRing:
    ring = KeyRing(tmp_path)
    ring.ensure([SERVICE])
    return ring


def audit_with(ring: KeyRing, producer: HeldProducer, **options: Any) -> KafkaAccessAudit:
    audit = KafkaAccessAudit(ring.signing_key(SERVICE), {"bootstrap.servers": "127.0.0.1:9", "log_level": 0}, **options)
    audit.producer = producer  # type: ignore[assignment]
    return audit


def a_decision(number: int) -> AccessDecision:
    return decision("alice", "cli", "/bastion.accounts.v1.Accounts/GetAccount", number % 2 == 0, "role customer",
                    f"corr-{number}")


def test_what_queued_while_the_publisher_was_busy_is_signed_as_batches_and_all_of_it_leaves(ring: KeyRing) -> None:
    producer = HeldProducer()
    audit = audit_with(ring, producer)  # batches of at most 500, the default
    audit.record(a_decision(0))
    assert producer.holding.wait(10)  # the publisher is busy with decision 0: the next 600 queue up
    for number in range(1, 601):
        audit.record(a_decision(number))
    producer.release.set()
    assert audit.flush() == 0
    audit.close()

    envelopes = producer.envelopes()
    assert producer.correlation_ids() == [f"corr-{n}" for n in range(601)]
    assert [e.sequence for e in envelopes] == list(range(1, 602))
    assert {topic for topic, _, _ in producer.records} == {TOPIC}
    assert len(producer.records) == 3, "one Kafka record per batch"
    assert len({e.aggregate_id for e in envelopes}) == 1
    assert {key for _, _, key in producer.records} == {envelopes[0].aggregate_id.encode()}
    bundles = [EnvelopeBundle.FromString(value) for _, value, _ in producer.records]
    assert [len(signed.envelopes) for signed in bundles] == [1, 500, 100]
    checker = SignatureChecker()
    public_key = ring.trust_store().public_key(SERVICE, ring.signing_key(SERVICE).key_id)
    for signed in bundles:
        checker.verify_bundle(signed, [Envelope.FromString(member) for member in signed.envelopes], public_key)
        for one in bundles_of_one(signed)[:3]:  # and each decision cut out of its bundle verifies alone
            checker.verify_bundle(one, [Envelope.FromString(one.envelopes[0])], public_key)
    assert checker.signature_checks == 3 + 1 + 3 + 3  # one per bundle, one per bundle of one


def lost() -> float:
    return REGISTRY.get_sample_value("bastion_access_decisions_lost_total", {"service": SERVICE}) or 0.0


def test_a_batch_that_cannot_be_built_is_counted_lost_and_the_publisher_goes_on(
    ring: KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures = iter([RuntimeError("no key today")])

    def sign_once_broken(bundle: Any, key: Any) -> None:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        sign_bundle(bundle, key)

    monkeypatch.setattr(audit_module, "sign_bundle", sign_once_broken)
    producer = HeldProducer()
    producer.release.set()
    audit = audit_with(ring, producer)
    before = lost()
    audit.record(a_decision(1))
    assert audit.flush() == 0
    audit.record(a_decision(2))
    assert audit.flush() == 0
    audit.close()
    assert lost() - before == 1
    assert producer.correlation_ids() == ["corr-2"]


class FailingProducer(HeldProducer):
    """Refuses the produce number FAIL_AT (counting from 0) with a KafkaException, keeps the others."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.release.set()
        self.fail_at = fail_at
        self.calls = 0

    def produce(self, topic: str, value: bytes, key: bytes, headers: Any = None, on_delivery: Any = None) -> None:
        self.calls += 1
        if self.calls - 1 == self.fail_at:
            raise KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT))
        super().produce(topic, value, key, headers, on_delivery)


def test_after_a_lost_batch_the_next_one_moves_to_a_fresh_aggregate(ring: KeyRing) -> None:
    """Published after the gap under the same aggregate, they would wait for a sequence number that never comes.
    A refused bundle loses all its decisions (the signature covers all or none), each counted."""
    producer = FailingProducer(fail_at=1)
    audit = audit_with(ring, producer, linger=0.2)  # each burst of records below is one batch
    before = lost()
    for burst in ((0, 1, 2), (3, 4), (5, 6), (7, 8)):
        for number in burst:
            audit.record(a_decision(number))
        assert audit.flush() == 0
    audit.close()
    envelopes = producer.envelopes()
    published = [(AccessDecision.FromString(e.payload).correlation_id, e.aggregate_id, e.sequence) for e in envelopes]
    first, second = published[0][1], published[3][1]
    assert first != second
    assert published == [("corr-0", first, 1), ("corr-1", first, 2), ("corr-2", first, 3),
                         ("corr-5", second, 1), ("corr-6", second, 2),
                         ("corr-7", second, 3), ("corr-8", second, 4)], "one fresh aggregate, not one per batch"
    assert lost() - before == 2
    checker = SignatureChecker()
    public_key = ring.trust_store().public_key(SERVICE, ring.signing_key(SERVICE).key_id)
    for _, value, _ in producer.records:
        signed = EnvelopeBundle.FromString(value)
        checker.verify_bundle(signed, [Envelope.FromString(member) for member in signed.envelopes], public_key)


def test_flush_gives_up_at_its_timeout_and_a_closed_audit_counts_what_comes_late(ring: KeyRing) -> None:
    producer = HeldProducer()  # never released: the first decision stays in the publisher's hands
    audit = audit_with(ring, producer)
    audit.record(a_decision(0))
    assert producer.holding.wait(10)
    started = time.monotonic()
    assert audit.flush(timeout=0.3) == 1
    assert time.monotonic() - started < 2
    producer.release.set()
    audit.close()
    before = lost()
    audit.record(a_decision(1))
    assert lost() - before == 1
    assert len(producer.records) == 1


def test_each_decision_occurs_when_it_was_recorded_on_the_topic_it_was_given(ring: KeyRing) -> None:
    producer = HeldProducer()
    producer.release.set()
    audit = audit_with(ring, producer, topic="bench.audit.v1")
    before = time.time_ns()
    audit.record(a_decision(0))
    recorded = time.time_ns()
    time.sleep(0.05)  # the batch is signed later than that
    audit.record(a_decision(1))
    assert audit.flush() == 0
    audit.close()
    envelopes = producer.envelopes()
    assert {topic for topic, _, _ in producer.records} == {"bench.audit.v1"}
    assert {envelope.topic for envelope in envelopes} == {"bench.audit.v1"}  # signed for it, not only sent there
    first = envelopes[0].occurred_at.seconds * 1_000_000_000 + envelopes[0].occurred_at.nanos
    published = envelopes[0].published_at.seconds * 1_000_000_000 + envelopes[0].published_at.nanos
    assert before <= first <= recorded  # occurred when recorded...
    assert first <= published  # ...published when its batch left (whenever the worker woke: not a timing claim)
    assert len({envelope.event_id for envelope in envelopes}) == 2


def test_a_full_queue_counts_what_it_cannot_take_and_keeps_the_rest(ring: KeyRing) -> None:
    producer = HeldProducer()  # holds the first decision: the next ones wait in the queue
    audit = audit_with(ring, producer, max_queued=3, linger=0)
    before = lost()
    audit.record(a_decision(0))
    assert producer.holding.wait(10)
    for number in range(1, 6):
        audit.record(a_decision(number))
    assert lost() - before == 2
    producer.release.set()
    assert audit.flush() == 0
    audit.close()
    assert producer.correlation_ids() == ["corr-0", "corr-1", "corr-2", "corr-3"]


def test_flush_waits_for_a_decision_recorded_while_the_publisher_was_idle(ring: KeyRing) -> None:
    producer = HeldProducer()
    producer.release.set()
    audit = audit_with(ring, producer, linger=0.05)
    time.sleep(0.1)  # the publisher has nothing to do and waits to be woken
    audit.record(a_decision(7))
    assert audit.flush(timeout=5) == 0
    assert len(producer.records) == 1
    audit.close()


def test_a_decision_recorded_while_the_audit_closes_is_published_not_stranded(
    ring: KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recording thread is held between its `closed?` check and its append while another thread closes."""
    producer = HeldProducer()
    producer.release.set()
    audit = audit_with(ring, producer)
    entered, go = threading.Event(), threading.Event()

    class HeldClock:
        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

        def time_ns(self) -> int:
            if threading.current_thread().name == "recorder":
                entered.set()
                go.wait(5)
            return time.time_ns()

    monkeypatch.setattr(audit_module, "time", HeldClock())
    before = lost()
    recorder = threading.Thread(target=audit.record, args=(a_decision(1),), name="recorder")
    recorder.start()
    assert entered.wait(5)
    closer = threading.Thread(target=audit.close)
    closer.start()
    time.sleep(0.1)  # close() is under way
    go.set()
    recorder.join(5)
    closer.join(15)
    assert not closer.is_alive()
    assert len(producer.records) == 1 and lost() == before


class UndeliveredProducer(HeldProducer):
    """Accepts every bundle, then reports the first one undelivered (as librdkafka does after its retries)."""

    def __init__(self) -> None:
        super().__init__()
        self.release.set()

    def produce(self, topic: str, value: bytes, key: bytes, headers: Any = None, on_delivery: Any = None) -> None:
        first = not self.records
        super().produce(topic, value, key, headers, on_delivery)
        if first:
            on_delivery(KafkaError(KafkaError._MSG_TIMED_OUT), None)


def test_a_bundle_reported_undelivered_counts_each_of_its_decisions_lost(ring: KeyRing) -> None:
    producer = UndeliveredProducer()
    audit = audit_with(ring, producer, linger=0.2)
    before = lost()
    for number in range(3):
        audit.record(a_decision(number))
    assert audit.flush() == 0
    audit.record(a_decision(3))
    assert audit.flush() == 0
    audit.close()
    assert lost() - before == 3
    first, second = ([Envelope.FromString(member) for member in EnvelopeBundle.FromString(value).envelopes]
                     for _, value, _ in producer.records)
    assert second[0].aggregate_id != first[0].aggregate_id and second[0].sequence == 1


def test_a_batch_of_long_decisions_is_cut_into_bundles_kafka_takes(
    ring: KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attacker's long paths to unknown methods must not make a bundle too large for Kafka, which would lose
    every decision in it: a path is kept bounded, each bundle stays under its cap (made small here), and every
    decision leaves, in order."""
    monkeypatch.setattr(audit_module, "MAX_BUNDLE_BYTES", 8_000)
    producer = HeldProducer()
    producer.release.set()
    audit = audit_with(ring, producer, linger=0.2)
    for number in range(120):
        audit.record(decision("mallory", "cli", "/" + "x" * 8_000, False, "no rule: denied by default",
                              f"corr-{number}"))
    assert audit.flush() == 0
    audit.close()
    assert len(producer.records) > 1
    assert all(len(value) <= audit_module.MAX_BUNDLE_BYTES + 4096 for _, value, _ in producer.records)
    assert producer.correlation_ids() == [f"corr-{number}" for number in range(120)]
    methods = {AccessDecision.FromString(envelope.payload).method for envelope in producer.envelopes()}
    assert methods == {"/" + "x" * (audit_module.MAX_METHOD - 1)}


def test_bundle_cuts_keep_each_run_within_the_budget() -> None:
    assert audit_module.bundle_cuts([10, 10, 10, 10], 25) == [2, 4]
    assert audit_module.bundle_cuts([30, 5, 5], 25) == [1, 3]  # an item over the budget goes alone
    assert audit_module.bundle_cuts([5], 25) == [1]
    assert audit_module.bundle_cuts([10, 15, 1], 25) == [2, 3]  # an exact fit stays together


def test_every_field_of_a_decision_is_sealed_as_it_was_recorded(ring: KeyRing) -> None:
    producer = HeldProducer()
    producer.release.set()
    audit = audit_with(ring, producer)
    audit.record(decision("alice", "cli", "/bastion.accounts.v1.Accounts/GetAccount", True, "role customer", "corr-a"))
    audit.record(
        decision("", "payments", "/bastion.accounts.v1.Accounts/Close", False, "permission denied: no rule", "corr-d")
    )
    assert audit.flush() == 0
    audit.close()
    envelopes = producer.envelopes()
    sealed = [AccessDecision.FromString(envelope.payload) for envelope in envelopes]
    assert [(d.principal, d.service_identity, d.method, d.decision, d.reason, d.correlation_id) for d in sealed] == [
        ("alice", "cli", "/bastion.accounts.v1.Accounts/GetAccount", DECISION_ALLOW, "role customer", "corr-a"),
        ("", "payments", "/bastion.accounts.v1.Accounts/Close", DECISION_DENY, "permission denied: no rule", "corr-d"),
    ]
    assert [(e.event_type, e.producer, e.correlation_id) for e in envelopes] == [
        (DECISION_TYPE, SERVICE, "corr-a"),
        (DECISION_TYPE, SERVICE, "corr-d"),
    ], "the envelope names the call, too"


def test_a_decision_keeps_300_characters_of_its_reason_and_256_of_its_method() -> None:
    kept = decision("alice", "cli", "/" + "m" * 255, False, "r" * 300, "corr-1")
    assert (kept.method, kept.reason) == ("/" + "m" * 255, "r" * 300)
    cut = decision("alice", "cli", "/" + "m" * 1000, False, "r" * 1000, "corr-1")
    assert (cut.method, cut.reason) == ("/" + "m" * 255, "r" * 300)


def test_an_idle_publisher_sends_a_decision_at_once_and_closes_at_once(ring: KeyRing) -> None:
    """The idle publisher waits for work a second at a time; a decision wakes it, and it waits only its linger
    (20 ms by default) for more. Neither a decision nor a close waits out the second."""
    producer = HeldProducer()
    producer.release.set()
    audit = audit_with(ring, producer)  # the default linger
    time.sleep(0.1)  # the publisher is waiting for work
    audit.record(a_decision(1))
    assert audit.flush(timeout=0.5) == 0
    time.sleep(0.1)  # and waiting again
    started = time.monotonic()
    audit.close()
    assert time.monotonic() - started < 0.5
    assert producer.correlation_ids() == ["corr-1"]


def test_decisions_recorded_within_the_linger_leave_as_one_bundle(ring: KeyRing) -> None:
    producer = HeldProducer()
    producer.release.set()
    audit = audit_with(ring, producer, linger=0.5)
    audit.record(a_decision(0))  # wakes the publisher, which then waits half a second for more
    time.sleep(0.1)
    audit.record(a_decision(1))
    assert audit.flush() == 0
    audit.close()
    assert len(producer.records) == 1 and producer.correlation_ids() == ["corr-0", "corr-1"]


class FullQueueProducer(HeldProducer):
    """librdkafka with its local queue full (BufferError) for the next FULL produce calls; counts the polls."""

    def __init__(self, full: int) -> None:
        super().__init__()
        self.release.set()
        self.full = full
        self.polls = 0

    def produce(self, topic: str, value: bytes, key: bytes, headers: Any = None, on_delivery: Any = None) -> None:
        if self.full > 0:
            self.full -= 1
            raise BufferError("Local: Queue full")
        super().produce(topic, value, key, headers, on_delivery)

    def poll(self, _timeout: float) -> int:
        self.polls += 1
        return 0


def test_a_full_producer_queue_is_waited_out_and_one_that_stays_full_counts_its_bundle_lost(ring: KeyRing) -> None:
    producer = FullQueueProducer(full=3)
    audit = audit_with(ring, producer, linger=0.2)
    before = lost()
    audit.record(a_decision(0))
    assert audit.flush() == 0
    assert producer.correlation_ids() == ["corr-0"] and lost() == before
    assert producer.polls >= 3, "the queue was given time to drain before each try"
    producer.full = 10**6  # and now it stays full
    audit.record(a_decision(1))
    audit.record(a_decision(2))
    assert audit.flush() == 0
    audit.close()
    assert producer.correlation_ids() == ["corr-0"]
    assert lost() - before == 2


class UndeliveredYet(HeldProducer):
    """Takes every bundle and delivers none yet: its flush reports them all still in flight, and is noted."""

    def __init__(self) -> None:
        super().__init__()
        self.release.set()
        self.flushes: list[float] = []
        self.purged = False

    def flush(self, timeout: float) -> int:
        self.flushes.append(timeout)
        return len(self.records)

    def purge(self) -> None:
        self.purged = True


def test_flush_and_close_wait_for_kafka_to_deliver_what_it_was_handed(ring: KeyRing) -> None:
    producer = UndeliveredYet()
    audit = audit_with(ring, producer)
    audit.record(a_decision(0))
    assert audit.flush(timeout=5) == 1, "handed to librdkafka is not yet delivered"
    assert 0 < producer.flushes[0] <= 5
    audit.close()
    assert len(producer.flushes) == 2 and producer.flushes[1] > 0
    assert producer.purged, "what Kafka did not acknowledge by then is purged, so that it is reported lost"


class CrashingProducer(HeldProducer):
    """Ends the publisher's thread with what it does not catch (only `Exception` is caught there)."""

    def produce(self, topic: str, value: bytes, key: bytes, headers: Any = None, on_delivery: Any = None) -> None:
        raise SystemExit("the publisher's thread is gone")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the crash is the point
def test_with_its_publisher_gone_flush_answers_at_once_and_close_counts_what_was_left_queued(ring: KeyRing) -> None:
    audit = audit_with(ring, CrashingProducer())
    audit.record(a_decision(0))
    audit.worker.join(5)
    assert not audit.worker.is_alive()
    audit.record(a_decision(1))
    before = lost()
    started = time.monotonic()
    assert audit.flush(timeout=5) == 2, "one in the dead publisher's hands, one queued"
    assert time.monotonic() - started < 2, "no waiting for a publisher that is gone"
    audit.close()
    assert lost() - before >= 1, "the decision still queued is counted lost"


def test_the_producer_is_idempotent_and_waits_for_every_replica_whatever_the_service_asks(
    ring: KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retried send must neither duplicate a decision nor lose one a leader took alone: the settings that say
    so are the audit's own, not the service's Kafka configuration's."""
    configs: list[dict[str, Any]] = []

    class RecordedConfig(HeldProducer):
        """Stands in for confluent_kafka.Producer: notes the configuration it was built with."""

        def __init__(self, config: dict[str, Any]) -> None:
            super().__init__()
            configs.append(config)

    monkeypatch.setattr(audit_module, "Producer", RecordedConfig)
    audit = KafkaAccessAudit(
        ring.signing_key(SERVICE), {"bootstrap.servers": "127.0.0.1:9", "acks": "1", "enable.idempotence": False}
    )
    audit.close()
    [config] = configs
    assert config["enable.idempotence"] is True and config["acks"] == "all"
    assert config["bootstrap.servers"] == "127.0.0.1:9"


def test_a_refused_bundle_of_a_long_batch_counts_only_its_own_decisions_lost(
    ring: KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_module, "MAX_BUNDLE_BYTES", 8_000)
    producer = FailingProducer(fail_at=0)
    audit = audit_with(ring, producer, linger=0.2)
    before = lost()
    for number in range(12):  # about 3 kB each: two to a bundle
        audit.record(decision("p" * 3_000, "cli", "/x/Y", False, "no rule: denied by default", f"corr-{number}"))
    assert audit.flush() == 0
    audit.close()
    assert producer.correlation_ids() == [f"corr-{number}" for number in range(2, 12)]
    assert lost() - before == 2


def test_however_long_its_decisions_no_record_is_too_large_for_kafka(ring: KeyRing) -> None:
    """A principal is as long as the caller's token allows (gRPC takes 8 kB of metadata): 500 of them are far
    over the 1 MB Kafka takes in one record, and must still leave, as several bundles."""
    producer = HeldProducer()
    producer.release.set()
    audit = audit_with(ring, producer, linger=0.5)
    for number in range(500):
        audit.record(decision("p" * 8_000, "cli", "/x/Y", True, "role customer", f"corr-{number}"))
    assert audit.flush() == 0
    audit.close()
    assert max(len(value) for _, value, _ in producer.records) < 1_000_000
    assert producer.correlation_ids() == [f"corr-{number}" for number in range(500)]


class UnacknowledgedProducer(UndeliveredYet):
    """A broker that never acknowledges: librdkafka holds each record until purged, then reports it failed."""

    def __init__(self) -> None:
        super().__init__()
        self.unacknowledged: list[Any] = []

    def produce(self, topic: str, value: bytes, key: bytes, headers: Any = None, on_delivery: Any = None) -> None:
        super().produce(topic, value, key, headers)
        self.unacknowledged.append(on_delivery)

    def poll(self, _timeout: float) -> int:
        if not self.purged:
            return 0
        failed, self.unacknowledged = self.unacknowledged, []
        for delivered in failed:
            delivered(KafkaError(KafkaError._PURGE_QUEUE), None)
        return len(failed)


def test_closing_counts_and_logs_each_decision_kafka_never_acknowledged(ring: KeyRing) -> None:
    # The service ends right after close(): what librdkafka still holds ends with it, so it must be counted then.
    producer = UnacknowledgedProducer()
    audit = audit_with(ring, producer)
    for number in range(3):
        audit.record(a_decision(number))
    assert audit.flush(timeout=1) == 1, "one bundle handed to librdkafka, never acknowledged"
    before = lost()
    audit.close(timeout=0.5)
    assert lost() - before == 3
    assert producer.unacknowledged == []
