"""The tables of the transactional outbox and the inbox, in each service's own database.

Services include `EVENTS_METADATA` in their Alembic migrations; tests create it directly.
"""

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    Index,
    LargeBinary,
    MetaData,
    String,
    Table,
    func,
    text,
)

EVENTS_METADATA = MetaData()

# Producer side: events written in the same transaction as the state change, published later by the relay.
outbox = Table(
    "event_outbox",
    EVENTS_METADATA,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("event_id", String(36), nullable=False, unique=True),
    Column("topic", String(249), nullable=False),
    Column("partition_key", String(200), nullable=False),
    Column("envelope", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("sent_at", DateTime(timezone=True)),
)
Index("event_outbox_unsent", outbox.c.id, postgresql_where=text("sent_at IS NULL"))

# Producer side: the last sequence number given to each aggregate's events.
producer_sequence = Table(
    "event_producer_sequence",
    EVENTS_METADATA,
    Column("aggregate_id", String(200), primary_key=True),
    Column("last_sequence", BigInteger, nullable=False),
)

# Consumer side: every event applied, by id (a replay or redelivery finds its row and has no effect).
inbox = Table(
    "event_inbox",
    EVENTS_METADATA,
    Column("event_id", String(36), primary_key=True),
    Column("producer", String(100), nullable=False),
    Column("aggregate_id", String(200), nullable=False),
    Column("sequence", BigInteger, nullable=False),
    Column("topic", String(249), nullable=False),
    Column("applied_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# Consumer side: the last sequence applied per (producer, aggregate).
consumer_sequence = Table(
    "event_consumer_sequence",
    EVENTS_METADATA,
    Column("producer", String(100), primary_key=True),
    Column("aggregate_id", String(200), primary_key=True),
    Column("last_sequence", BigInteger, nullable=False),
)

# Consumer side: events that arrived ahead of a gap, applied once the gap is filled. A gap that stays open is
# reported once (`inbox.open_gaps`): `source` says where the held event was read (topic/partition/offset[/item]),
# `reported_gap` the missing sequence it was last reported behind.
held = Table(
    "event_held",
    EVENTS_METADATA,
    Column("producer", String(100), primary_key=True),
    Column("aggregate_id", String(200), primary_key=True),
    Column("sequence", BigInteger, primary_key=True),
    Column("topic", String(249), nullable=False),
    Column("envelope", LargeBinary, nullable=False),
    Column("held_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("source", String(300)),
    Column("reported_gap", BigInteger),
)
