"""Steps 6 and 7 of the verification pipeline, inside the consumer's database transaction: the inbox (an
event id seen before has no second effect) and the per-(producer, aggregate) sequence (lower or equal is
a replay; a gap holds the event back until the missing ones arrive, and one that stays open is reported)."""

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import Connection, and_, delete, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert

from bastion.events.storage import consumer_sequence, held, inbox
from bastion.events.verify import VerifiedEvent


class Admission(StrEnum):
    APPLY = "apply"
    DUPLICATE = "duplicate"
    REPLAY = "replay"
    HELD = "held"


def admit(conn: Connection, event: VerifiedEvent, source: str | None = None) -> Admission:
    """Decide what to do with a verified event; locks its (producer, aggregate) row until commit. SOURCE says where
    the event was read (`consumer.source_of`), kept with it if it is held."""
    env = event.envelope
    # Seed the row first, so that FOR UPDATE below serialises even two consumers of an aggregate's first event.
    conn.execute(insert(consumer_sequence).values(producer=env.producer, aggregate_id=env.aggregate_id,
                                                  last_sequence=0).on_conflict_do_nothing())
    last = conn.execute(
        select(consumer_sequence.c.last_sequence)
        .where(consumer_sequence.c.producer == env.producer, consumer_sequence.c.aggregate_id == env.aggregate_id)
        .with_for_update()
    ).scalar_one()
    if conn.execute(select(inbox.c.event_id).where(inbox.c.event_id == env.event_id)).first():
        return Admission.DUPLICATE
    if env.sequence <= last:
        return Admission.REPLAY
    if env.sequence > last + 1:
        conn.execute(
            insert(held)
            .values(producer=env.producer, aggregate_id=env.aggregate_id, sequence=env.sequence, topic=env.topic,
                    envelope=held_form(event), source=source)
            .on_conflict_do_nothing()
        )
        return Admission.HELD
    return Admission.APPLY


def record(conn: Connection, event: VerifiedEvent) -> None:
    """Write the inbox row and advance the sequence, in the transaction that applied the effect."""
    env = event.envelope
    conn.execute(insert(inbox).values(event_id=env.event_id, producer=env.producer, aggregate_id=env.aggregate_id,
                                      sequence=env.sequence, topic=env.topic))
    conn.execute(
        insert(consumer_sequence)
        .values(producer=env.producer, aggregate_id=env.aggregate_id, last_sequence=env.sequence)
        .on_conflict_do_update(
            index_elements=[consumer_sequence.c.producer, consumer_sequence.c.aggregate_id],
            set_={"last_sequence": env.sequence},
        )
    )


# A held event that came in a bundle is kept as a bundle of one behind this marker (an envelope never starts
# with a zero byte: protobuf has no field 0), so that it is read back with the parser it needs.
HELD_BUNDLE = b"\x00bundle\x00"


def held_form(event: VerifiedEvent) -> bytes:
    """What the held table keeps of EVENT: bytes that verify it alone again when it is released."""
    return HELD_BUNDLE + event.alone() if event.bundle is not None else event.alone()


def unwrap_held(form: bytes) -> tuple[bytes, bool]:
    """The bytes a `held_form` holds, and whether they are a bundle (of one)."""
    if form.startswith(HELD_BUNDLE):
        return form[len(HELD_BUNDLE):], True
    return form, False


def take_held(conn: Connection, producer: str, aggregate_id: str, sequence: int) -> bytes | None:
    """Remove and return the held event with this sequence, if one arrived early (`held_form`)."""
    row = conn.execute(
        delete(held)
        .where(held.c.producer == producer, held.c.aggregate_id == aggregate_id, held.c.sequence == sequence)
        .returning(held.c.envelope)
    ).first()
    return bytes(row.envelope) if row else None


# Aggregates one look for open gaps reports at most; the others wait for the next look.
MAX_GAPS_PER_LOOK = 100


@dataclass(frozen=True)
class OpenGap:
    """A gap in an aggregate's sequence behind which an event has waited longer than the consumer waits."""

    producer: str
    aggregate_id: str
    missing: int  # the first sequence the consumer waits for: the last one applied, plus one
    first_held: int  # the first event held behind it (so MISSING to FIRST_HELD - 1 are missing): its place, form
    source: str | None  # None for an event held before sources were kept
    form: bytes
    topic: str
    held_since: dt.datetime
    held: int  # events of the aggregate held behind it
    reported_before: bool  # this gap (this missing sequence) was reported already: nothing new to raise

    @property
    def missing_range(self) -> str:
        last = self.first_held - 1
        return f"sequence {self.missing}" if last <= self.missing else f"sequences {self.missing} to {last}"


def open_gaps(conn: Connection, topics: list[str], held_for: dt.timedelta,
              limit: int = MAX_GAPS_PER_LOOK) -> list[OpenGap]:
    """The gaps of aggregates on TOPICS behind which an event has waited longer than HELD_FOR and that were not
    reported behind their current missing sequence (once a gap fills, a gap further on is a new one), oldest first.

    Each aggregate's sequence row is locked first, as `admit` locks it, skipping those another transaction holds
    (a consumer applying the aggregate's events, or another replica looking): a gap is reported once, and never
    while it is being filled. The held rows are marked with the gap they are reported behind, in CONN's
    transaction."""
    cutoff = conn.execute(select(func.now())).scalar_one() - held_for
    same_aggregate = and_(consumer_sequence.c.producer == held.c.producer,
                          consumer_sequence.c.aggregate_id == held.c.aggregate_id)
    due = and_(held.c.held_at < cutoff,
               or_(held.c.reported_gap.is_(None), held.c.reported_gap <= consumer_sequence.c.last_sequence))
    waiting = conn.execute(
        select(held.c.producer, held.c.aggregate_id)
        .join(consumer_sequence, same_aggregate)
        .where(held.c.topic.in_(topics), due)
        .group_by(held.c.producer, held.c.aggregate_id)
        .order_by(func.min(held.c.held_at))
        .limit(limit)
    ).all()
    gaps = []
    for producer, aggregate_id in waiting:
        last = conn.execute(
            select(consumer_sequence.c.last_sequence)
            .where(consumer_sequence.c.producer == producer, consumer_sequence.c.aggregate_id == aggregate_id)
            .with_for_update(skip_locked=True)
        ).scalar()
        if last is None:
            continue  # locked: being applied or looked at elsewhere; the next look sees what it left
        of_aggregate = (held.c.producer == producer, held.c.aggregate_id == aggregate_id)
        behind = conn.execute(
            select(held.c.sequence, held.c.topic, held.c.source, held.c.held_at, held.c.reported_gap)
            .where(*of_aggregate).order_by(held.c.sequence)
        ).all()
        missing = last + 1
        marked = [row.sequence for row in behind
                  if row.held_at < cutoff and (row.reported_gap is None or row.reported_gap < missing)]
        if not marked:
            continue  # filled, or reported, since the first query
        conn.execute(update(held).where(*of_aggregate, held.c.sequence.in_(marked)).values(reported_gap=missing))
        first = behind[0]
        form = conn.execute(select(held.c.envelope).where(*of_aggregate, held.c.sequence == first.sequence)
                            ).scalar_one()
        gaps.append(OpenGap(producer, aggregate_id, missing, first.sequence, first.source, bytes(form), first.topic,
                            first.held_at, len(behind), any(row.reported_gap == missing for row in behind)))
    return gaps


@dataclass(frozen=True)
class HeldAggregate:
    """What an operator reads about one aggregate with events held (`bastion events held`)."""

    producer: str
    aggregate_id: str
    topic: str
    last_applied: int
    first_held: int
    held: int
    held_since: dt.datetime
    reported_gap: int | None  # the missing sequence it was last reported behind, if it was

    @property
    def waiting_for(self) -> str:
        first, last = self.last_applied + 1, self.first_held - 1
        return f"sequence {first}" if last <= first else f"sequences {first} to {last}"


def held_aggregates(conn: Connection, limit: int = 200) -> list[HeldAggregate]:
    """The aggregates with events held, those held longest first."""
    rows = conn.execute(
        select(held.c.producer, held.c.aggregate_id, func.min(held.c.topic), consumer_sequence.c.last_sequence,
               func.min(held.c.sequence), func.count(), func.min(held.c.held_at), func.max(held.c.reported_gap))
        .join(consumer_sequence, and_(consumer_sequence.c.producer == held.c.producer,
                                      consumer_sequence.c.aggregate_id == held.c.aggregate_id))
        .group_by(held.c.producer, held.c.aggregate_id, consumer_sequence.c.last_sequence)
        .order_by(func.min(held.c.held_at))
        .limit(limit)
    ).all()
    return [HeldAggregate(*row) for row in rows]
