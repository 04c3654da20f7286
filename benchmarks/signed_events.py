"""Benchmark of signed events: Ed25519 sign and verify rates, and end-to-end throughput signed vs unsigned.

Run with `.venv/bin/python -m benchmarks.signed_events [--events N]` (uses the dev install in .state and
starts it if it is not running; it is left running). Prints:
1. single-core rates over realistic envelopes: `seal` (build + sign) and `EnvelopeVerifier.verify` on the
   serialized bytes (steps 1-5), each next to the bare Ed25519 operation;
2. publish-consume throughput against the dev stack's real Kafka, in the same run: N events produced with
   an idempotent producer (acks=all) while a consumer group reads them, unsigned (the bare payload bytes,
   parsed as the payload protobuf) and signed (the envelope, verified through steps 1-5, no database).

Each measured run has its own throw-away topic `bench.<uuid>.v1` (3 partitions, like accounts.events.v1,
LogAppendTime so freshness is checked against the broker's stamp), its own consumer group, and ACLs for
the producer `accounts` and the consumer `notifications` only; all are removed at the end.
Events are sealed before the clock starts, as the outbox does in the service's own transaction: the relay
publishes stored bytes, so signing cost is what part 1 reports, not part of the end-to-end figure.
"""

import argparse
import datetime as dt
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from confluent_kafka import TIMESTAMP_LOG_APPEND_TIME, Consumer, KafkaError, Producer

from bastion.accounts.v1.events_pb2 import MoneyDeposited
from bastion.devstack.components.kafka import Kafka
from bastion.devstack.context import StackContext
from bastion.devstack.event_access import EventAccessPolicy, TopicPolicy
from bastion.devstack.kafka_admin import KafkaAdmin
from bastion.devstack.stack import Stack
from bastion.events.envelopes import seal
from bastion.events.errors import VerificationError
from bastion.events.keys import KeyRing, SigningKey, TrustStore
from bastion.events.signing import signed_bytes
from bastion.events.trust import TrustPolicy
from bastion.events.v1.envelope_pb2 import Envelope
from bastion.events.verify import EnvelopeVerifier
from bastion.settings import DevstackSettings

PRODUCER = "accounts"
CONSUMER = "notifications"
EVENT_TYPE = str(MoneyDeposited.DESCRIPTOR.full_name)
PARTITIONS = 3
AGGREGATES = 500
CONSUME_BATCH = 500
# Records per verification task: large enough that pickling and the hop to a worker are noise next to
# ~200 µs of verification per record, small enough that the last task adds little to the end time.
VERIFY_CHUNK = 200
TIMEOUT = 120.0

# Verification runs in a ProcessPoolExecutor, the faster of the two measured on this 2-core machine.
# cryptography 50 releases the GIL around the Ed25519 operation itself (bare verify: ~1.8x with 2 threads),
# but the rest of steps 1-5 (protobuf parse, unknown-field walk, signed bytes, checks) and the consumer hold
# it: end to end, 50000 events, 3 alternating runs each, processes 8.7k-11.6k events/s, threads 5.9k-8.3k.
# `--pool thread` repeats the comparison.
POOLS = ("process", "thread")

Record = tuple[bytes, int | None]  # record value, broker append time in ms (None if not LogAppendTime)


def bastion(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "bastion.cli", *args], check=True, capture_output=True)


def payload(number: int, account: str) -> MoneyDeposited:
    """A deposit as the accounts service would publish it: UUID-sized ids, amounts, an idempotency key."""
    return MoneyDeposited(account_id=account, amount_minor=1_000 + number % 97_531, currency="EUR",
                          balance_minor=10_000_000 + number * 1_234, idempotency_key=str(uuid.uuid4()))


def seal_events(key: SigningKey, topic: str, count: int) -> list[Envelope]:
    """COUNT signed deposits spread over AGGREGATES accounts, each account's sequence counting from 1."""
    accounts = [f"acc-{uuid.uuid4()}" for _ in range(AGGREGATES)]
    sequences = [0] * AGGREGATES
    envelopes = []
    for number in range(count):
        slot = number % AGGREGATES
        sequences[slot] += 1
        envelopes.append(seal(key, topic, payload(number, accounts[slot]), accounts[slot], sequences[slot],
                              correlation_id=str(uuid.uuid4())))
    return envelopes


def per_second(count: int, seconds: float) -> str:
    return f"{count / seconds:>10,.0f} events/s {seconds / count * 1e6:>8.1f} µs/event"


def timed(action: Callable[[], None]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def crypto_rates(key: SigningKey, trust_store: TrustStore, count: int) -> None:
    topic = f"bench.{uuid.uuid4().hex}.v1"
    verifier = EnvelopeVerifier(trust_store, TrustPolicy({topic: {PRODUCER: frozenset({EVENT_TYPE})}}))
    envelopes: list[Envelope] = []
    sealing = timed(lambda: envelopes.extend(seal_events(key, topic, count)))
    raws = [envelope.SerializeToString() for envelope in envelopes]
    signed = [(envelope.signature, signed_bytes(envelope)) for envelope in envelopes]
    public = trust_store.public_key(PRODUCER, key.key_id)

    def sign_bare() -> None:
        for _, data in signed:
            key.private_key.sign(data)

    def verify_full() -> None:
        for raw in raws:
            verifier.verify(raw, topic)

    def verify_bare() -> None:
        for signature, data in signed:
            public.verify(signature, data)

    size = sum(len(raw) for raw in raws) / len(raws)
    print(f"Ed25519, single core, {count} envelopes ({EVENT_TYPE}, {size:.0f} bytes on average):")
    print(f"  {'seal (build + sign)':<28}{per_second(count, sealing)}")
    print(f"  {'Ed25519 sign only':<28}{per_second(count, timed(sign_bare))}")
    print(f"  {'verify steps 1-5 (bytes)':<28}{per_second(count, timed(verify_full))}")
    print(f"  {'Ed25519 verify only':<28}{per_second(count, timed(verify_bare))}")


# --- verification workers (module level, so that spawned processes can import them) ---

_worker_verifier: EnvelopeVerifier | None = None


def init_worker(trust_store_json: str, allowed: dict[str, dict[str, frozenset[str]]]) -> None:
    global _worker_verifier
    _worker_verifier = EnvelopeVerifier(TrustStore.from_json(trust_store_json), TrustPolicy(allowed))


def verify_batch(topic: str, records: list[Record]) -> tuple[int, str]:
    """Steps 1-5 for each record: the number verified and the first refusal (VerificationError does not
    survive pickling, so the reason travels as text)."""
    verifier = _worker_verifier
    if verifier is None:
        raise RuntimeError("verification worker not initialised")
    verified = 0
    for raw, millis in records:
        broker_time = None if millis is None else dt.datetime.fromtimestamp(millis / 1000, dt.UTC)
        try:
            verifier.verify(raw, topic, broker_time)
        except VerificationError as error:
            return verified, str(error)
        verified += 1
    return verified, ""


def worker_pid(pause: float) -> int:
    time.sleep(pause)
    return os.getpid()


def verification_pool(kind: str, workers: int, trust_store_json: str, topic: str) -> Executor:
    """A started pool: every worker is up and initialised before any clock runs."""
    initargs = (trust_store_json, {topic: {PRODUCER: frozenset({EVENT_TYPE})}})
    executor: Executor
    if kind == "process":
        # spawn, not fork: the parent already runs librdkafka threads, which a fork would copy half-way.
        executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=init_worker, initargs=initargs)
    else:
        executor = ThreadPoolExecutor(workers, initializer=init_worker, initargs=initargs)
    pids = set(executor.map(worker_pid, [0.5] * workers))
    if kind == "process" and len(pids) != workers:
        raise SystemExit(f"only {len(pids)} of {workers} verification processes started")
    return executor


# --- end to end ---


class Sink(Protocol):
    def take(self, batch: list[Record]) -> None: ...

    def finish(self) -> float:
        """Wait for everything taken; the perf_counter time the last event was done."""
        ...


class ParseSink:
    """Unsigned baseline: the record is the bare payload, parsed as the payload protobuf."""

    def __init__(self) -> None:
        self.done_at = 0.0

    def take(self, batch: list[Record]) -> None:
        for raw, _ in batch:
            MoneyDeposited.FromString(raw)
        self.done_at = time.perf_counter()

    def finish(self) -> float:
        return self.done_at


class VerifySink:
    """Signed: batches of envelopes verified (steps 1-5) in the pool while the consumer keeps reading."""

    def __init__(self, executor: Executor, topic: str, expected: int) -> None:
        self.executor = executor
        self.topic = topic
        self.expected = expected
        self.futures: list[Future[tuple[int, str]]] = []
        self.lock = threading.Lock()
        self.done_at = 0.0

    def take(self, batch: list[Record]) -> None:
        for start in range(0, len(batch), VERIFY_CHUNK):
            future = self.executor.submit(verify_batch, self.topic, batch[start:start + VERIFY_CHUNK])
            future.add_done_callback(self._done)
            self.futures.append(future)

    def _done(self, _future: Future[tuple[int, str]]) -> None:
        now = time.perf_counter()
        with self.lock:
            self.done_at = max(self.done_at, now)

    def finish(self) -> float:
        verified = 0
        for future in self.futures:
            count, refusal = future.result(timeout=TIMEOUT)
            if refusal:
                raise SystemExit(f"a benchmark event was refused: {refusal}")
            verified += count
        if verified != self.expected:
            raise SystemExit(f"verified {verified} of {self.expected} events")
        return self.done_at


@dataclass(frozen=True)
class Lane:
    """One measured run's own topic and consumer group, with the ACLs that let accounts and notifications in."""

    topic: str
    group: str

    @property
    def access(self) -> EventAccessPolicy:
        return EventAccessPolicy({self.topic: TopicPolicy(
            self.topic, PARTITIONS, (PRODUCER,), {CONSUMER: self.group}, {"message.timestamp.type": "LogAppendTime"}
        )})


def open_lane(admin: KafkaAdmin, lanes: list[Lane]) -> Lane:
    suffix = uuid.uuid4().hex
    lane = Lane(f"bench.{suffix}.v1", f"bench-{suffix}")
    lanes.append(lane)  # before creating anything, so that clean-up sees it whatever fails
    admin.ensure_topics(lane.access)
    admin.grant(lane.access.grants())
    return lane


def close_lanes(admin: KafkaAdmin, lanes: list[Lane]) -> None:
    for lane in lanes:
        admin.revoke(lane.access.grants())
    if lanes:
        for future in admin.client.delete_topics([lane.topic for lane in lanes], operation_timeout=30).values():
            future.result()


def consume(config: dict[str, Any], lane: Lane, expected: int, sink: Sink, assigned: threading.Event,
            failures: list[str]) -> None:
    consumer = Consumer({**config, "group.id": lane.group, "auto.offset.reset": "earliest",
                         "isolation.level": "read_committed"})  # offsets auto-committed: the same in both cases
    try:
        consumer.subscribe([lane.topic], on_assign=lambda _consumer, _partitions: assigned.set())
        deadline = time.monotonic() + TIMEOUT
        while not assigned.is_set() and time.monotonic() < deadline:
            consumer.poll(0.1)  # joins the group; the topic is still empty
        seen = 0
        while seen < expected and time.monotonic() < deadline:
            batch: list[Record] = []
            for message in consumer.consume(CONSUME_BATCH, 0.1):
                if message.error():
                    if message.error().code() != KafkaError._PARTITION_EOF:
                        raise RuntimeError(message.error().str())
                    continue
                kind, millis = message.timestamp()
                batch.append((message.value(), millis if kind == TIMESTAMP_LOG_APPEND_TIME else None))
            if batch:
                sink.take(batch)
                seen += len(batch)
        if seen != expected:
            raise RuntimeError(f"consumed {seen} of {expected} events within {TIMEOUT:.0f}s")
    except Exception as error:  # reported by the main thread, which owns the outcome
        failures.append(f"consumer: {error}")
        assigned.set()
    finally:
        consumer.close()


def publish_consume(kafka: Kafka, ctx: StackContext, lane: Lane, records: Sequence[tuple[bytes, bytes]],
                    sink: Sink) -> float:
    """Seconds from the first produce to the last event consumed and handled by SINK."""
    failures: list[str] = []

    def delivery_failed(error: KafkaError | None, _message: Any) -> None:
        if error is not None:
            failures.append(f"delivery: {error.str()}")

    producer = Producer({**kafka.client_config(PRODUCER, ctx.credentials.kafka[PRODUCER]),
                         "enable.idempotence": True, "acks": "all", "linger.ms": 5,
                         "delivery.report.only.error": True, "on_delivery": delivery_failed})
    producer.list_topics(lane.topic, timeout=30)  # connection, SASL and metadata before the clock starts
    assigned = threading.Event()
    reader = threading.Thread(target=consume, name="consumer", args=(
        kafka.client_config(CONSUMER, ctx.credentials.kafka[CONSUMER]), lane, len(records), sink, assigned,
        failures))
    reader.start()
    if not assigned.wait(TIMEOUT) or failures:
        reader.join()
        raise SystemExit(f"the consumer did not join its group: {failures}")
    started = time.perf_counter()
    for number, (key, value) in enumerate(records):
        while True:
            try:
                producer.produce(lane.topic, value=value, key=key)
                break
            except BufferError:  # local queue full: let librdkafka send some
                producer.poll(0.05)
        if number % 1000 == 0:
            producer.poll(0)
    if producer.flush(TIMEOUT):
        failures.append("delivery: not every event was acknowledged in time")
    reader.join()
    if failures:
        raise SystemExit(f"{lane.topic}: {failures[:3]}")
    return sink.finish() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=20_000, help="events per end-to-end run (default 20000)")
    parser.add_argument("--micro", type=int, default=5_000, help="envelopes for the single-core rates")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="verification workers")
    parser.add_argument("--pool", choices=POOLS, default="process", help="verification pool (default process)")
    options = parser.parse_args()

    bastion("up")
    ctx = Stack(DevstackSettings(), progress=lambda message: None).context()
    kafka = Kafka(ctx)
    admin = kafka.admin()
    lanes: list[Lane] = []
    with tempfile.TemporaryDirectory(prefix="bench-keys-") as keys:
        ring = KeyRing(Path(keys))
        ring.ensure([PRODUCER])
        key, trust_store = ring.signing_key(PRODUCER), ring.trust_store()
        crypto_rates(key, trust_store, options.micro)
        try:
            # An untimed warm-up run, so that neither measured run pays for the broker's first requests.
            warm_up = open_lane(admin, lanes)
            warm = seal_events(key, warm_up.topic, min(2_000, options.events))
            publish_consume(kafka, ctx, warm_up, [(e.aggregate_id.encode(), e.payload) for e in warm], ParseSink())

            plain_lane, signed_lane = open_lane(admin, lanes), open_lane(admin, lanes)
            plain = seal_events(key, plain_lane.topic, options.events)
            unsigned = publish_consume(kafka, ctx, plain_lane,
                                       [(e.aggregate_id.encode(), e.payload) for e in plain], ParseSink())

            envelopes = seal_events(key, signed_lane.topic, options.events)
            executor = verification_pool(options.pool, options.workers, ring.trust_store_file.read_text(),
                                         signed_lane.topic)
            with executor:
                signed = publish_consume(
                    kafka, ctx, signed_lane, [(e.aggregate_id.encode(), e.SerializeToString()) for e in envelopes],
                    VerifySink(executor, signed_lane.topic, options.events),
                )
        finally:
            close_lanes(admin, lanes)

    n = options.events
    print(f"end to end, {n} events, {PARTITIONS} partitions, idempotent producer (acks=all) and consumer group "
          f"concurrently, dev-stack Kafka at {kafka.bootstrap_address}:")
    print(f"  {'unsigned (payload parse)':<44}{n / unsigned:>10,.0f} events/s  ({unsigned:.2f} s)")
    print(f"  {f'signed (steps 1-5, {options.workers} {options.pool} workers)':<44}{n / signed:>10,.0f} events/s"
          f"  ({signed:.2f} s)")
    print(f"  {'ratio signed/unsigned':<44}{unsigned / signed:>10.2f}  (aim: >= 0.8)")


if __name__ == "__main__":
    main()
