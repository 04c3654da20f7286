"""A relay or a verifying consumer in a process of its own, so tests can kill -9 it at a chosen moment.

Usage: python -m tests.integration.event_worker CONFIG.json (see `WorkerConfig`).
"""

import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, Column, Connection, Engine, MetaData, String, Table, create_engine

from bastion.events.consumer import ConsumerSettings, VerifyingConsumer
from bastion.events.keys import KeyRing
from bastion.events.outbox import OutboxRelay
from bastion.events.storage import EVENTS_METADATA
from bastion.events.trust import TrustPolicy
from bastion.events.verify import EnvelopeVerifier, VerifiedEvent

APPLIED_TABLES = MetaData()
applied = Table(
    "it_worker_applied", APPLIED_TABLES,
    Column("event_id", String(36), primary_key=True),
    Column("aggregate_id", String(200), nullable=False),
    Column("sequence", BigInteger, nullable=False),
    Column("applied_ns", BigInteger, nullable=False),
)


@dataclass(frozen=True)
class WorkerConfig:
    mode: str                      # "relay" or "consumer"
    db_url: str
    schema: str                    # every table of the test lives in its own schema
    kafka: dict[str, Any]
    topic: str = ""
    group: str = ""
    keys_dir: str = ""
    trust: dict[str, dict[str, list[str]]] | None = None
    batch_size: int = 200
    stall_on_sequence: int = 0     # consumer: block forever in the handler of this sequence (first time)
    stall_before_marking_sent: bool = False  # relay: block forever once a batch is acknowledged, before marking it
    marker: str = ""               # file written when the worker reached the interesting moment


def schema_engine(db_url: str, schema: str) -> Engine:
    return create_engine(db_url, pool_pre_ping=True).execution_options(schema_translate_map={None: schema})


def run_consumer(config: WorkerConfig, engine: Engine) -> None:
    ring = KeyRing(Path(config.keys_dir))
    trust = TrustPolicy({topic: {p: frozenset(types) for p, types in producers.items()}
                         for topic, producers in (config.trust or {}).items()})

    def handler(conn: Connection, event: VerifiedEvent) -> None:
        if event.envelope.sequence == config.stall_on_sequence:
            Path(config.marker).write_text("stalled")
            time.sleep(3600)
        conn.execute(applied.insert().values(event_id=event.event_id, aggregate_id=event.envelope.aggregate_id,
                                             sequence=event.envelope.sequence, applied_ns=time.time_ns()))

    consumer = VerifyingConsumer(
        ConsumerSettings("notifications", config.group, [config.topic], batch_size=config.batch_size),
        config.kafka, EnvelopeVerifier(ring.trust_store(), trust), engine, handler,
    )
    consumer.run(threading.Event())


class StallingRelay(OutboxRelay):
    """Publishes a batch, has it acknowledged, then waits to be killed before marking it sent."""

    marker = ""

    def _mark_sent(self, conn: Connection, delivered: list[int]) -> None:
        Path(self.marker).write_text("published, not marked sent")
        time.sleep(3600)


def run_relay(config: WorkerConfig, engine: Engine) -> None:
    key = KeyRing(Path(config.keys_dir)).signing_key("accounts")
    relay: OutboxRelay
    if config.stall_before_marking_sent:
        stalling = StallingRelay(engine, config.kafka, key, batch_size=config.batch_size)
        stalling.marker = config.marker
        relay = stalling
    else:
        relay = OutboxRelay(engine, config.kafka, key, batch_size=config.batch_size)
    while True:
        result = relay.run_once()
        if result.published and config.marker:
            Path(config.marker).write_text("published")
        if not result.published:
            time.sleep(0.1)


def main() -> None:
    config = WorkerConfig(**json.loads(Path(sys.argv[1]).read_text()))
    engine = schema_engine(config.db_url, config.schema)
    if config.mode == "relay":
        run_relay(config, engine)
    else:
        run_consumer(config, engine)


if __name__ == "__main__":
    main()


def create_schema(engine: Engine, schema: str) -> Engine:
    """A fresh schema holding the kit's tables and the applied-events table, for one test."""
    with engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    scoped = engine.execution_options(schema_translate_map={None: schema})
    EVENTS_METADATA.create_all(scoped)
    APPLIED_TABLES.create_all(scoped)
    return scoped
