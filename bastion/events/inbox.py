"""Steps 6 and 7 of the verification pipeline, inside the consumer's database transaction: the inbox (an
event id seen before has no second effect) and the per-(producer, aggregate) sequence (lower or equal is
a replay; a gap holds the event back until the missing ones arrive)."""

from enum import StrEnum

from sqlalchemy import Connection, delete, select
from sqlalchemy.dialects.postgresql import insert

from bastion.events.storage import consumer_sequence, held, inbox
from bastion.events.verify import VerifiedEvent


class Admission(StrEnum):
    APPLY = "apply"
    DUPLICATE = "duplicate"
    REPLAY = "replay"
    HELD = "held"


def admit(conn: Connection, event: VerifiedEvent) -> Admission:
    """Decide what to do with a verified event; locks its (producer, aggregate) row until commit."""
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
                    envelope=held_form(event))
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


def take_held(conn: Connection, producer: str, aggregate_id: str, sequence: int) -> bytes | None:
    """Remove and return the held event with this sequence, if one arrived early (`held_form`)."""
    row = conn.execute(
        delete(held)
        .where(held.c.producer == producer, held.c.aggregate_id == aggregate_id, held.c.sequence == sequence)
        .returning(held.c.envelope)
    ).first()
    return bytes(row.envelope) if row else None
