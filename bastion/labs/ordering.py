"""The ordering lab: two genuine events of one account delivered in the wrong order. Each verifying consumer that
applies events must hold the later one back until the earlier one comes, then apply both in their order, once each.

The events go to an account nobody has, so that the reordering touches nobody's data; the evidence is read from
each consumer's own database as that service's role: the event it holds, its inbox, and the last sequence it
applied per aggregate (its log line for the held event is shown beside)."""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.pool import NullPool

from bastion.audit.alerts import ALERTING_SERVICE
from bastion.devstack.components.postgres import Postgres
from bastion.events.storage import consumer_sequence, held, inbox
from bastion.labs.base import Evidence
from bastion.labs.events import ACCOUNTS_TOPIC, forged_deposit
from bastion.labs.platform import LabSetupError, Session, new_correlation_id

LAB = "reordered-events"
PRODUCER = "accounts"


@dataclass(frozen=True)
class Applied:
    """What one consumer's database says of an aggregate: the sequences in its inbox, the last one applied, and how
    many events it still holds."""

    sequences: tuple[int, ...]
    last: int
    held: int

    def __str__(self) -> str:
        return (f"inbox holds sequences {list(self.sequences)}, last applied sequence {self.last}, "
                f"{self.held} held")


def reordered_events(session: Session) -> Iterator[Evidence]:
    route = session.target.event_routes[ACCOUNTS_TOPIC]
    # The audit service keeps every event it is given, as it came, and applies none: it has no order to keep.
    holders = [consumer for consumer in route.consumers if consumer != ALERTING_SERVICE]
    if not holders or any(holder not in session.ctx.service_names for holder in holders):
        raise LabSetupError(f"{route.topic} has no verifying consumer of the platform that applies its events")
    correlation_id = new_correlation_id(LAB)
    first = forged_deposit(session, PRODUCER, ACCOUNTS_TOPIC, 100, correlation_id, sequence=1)
    second = forged_deposit(session, PRODUCER, ACCOUNTS_TOPIC, 200, correlation_id, sequence=2,
                            account=first.aggregate_id)
    account = first.aggregate_id
    yield Evidence("the stream", f"events 1 and 2 of account {account[:8]}… (deposits, genuinely signed by "
                   f"{PRODUCER}), event 2 delivered first")
    engines = {holder: _engine(session, holder) for holder in holders}
    try:
        watch = session.watch()
        _publish(session, route.topic, second.SerializeToString(), account)
        try:
            seen = {holder: _wait_for(session, engine, account, lambda state: bool(state.held or state.sequences))
                    for holder, engine in engines.items()}
        finally:
            # At once, and whatever happened: event 2 left alone would be reported as a gap after a while.
            _publish(session, route.topic, first.SerializeToString(), account)
        for holder, state in seen.items():
            if state is None:  # nothing held, nothing applied: event 2 dropped, or the consumer not reading at all
                if _wait_for(session, engines[holder], account, lambda now: bool(now.sequences)) is None:
                    raise LabSetupError(f"{holder} took neither event within {session.target.verdict_wait_seconds:g}s "
                                        "(is it running and caught up?)")
                state = _applied(engines[holder], account)  # it reads, so event 2 came and went without a trace
            yield Evidence(f"{holder} holds event 2 back", str(state), state.held == 1 and not state.sequences)
            held_line = watch.log_lines(holder, "event_held_behind_sequence_gap", correlation_id)
            if held_line:
                yield Evidence(f"{holder}.log", held_line[0])
        yield Evidence("event 1 arrives", f"published to {route.topic} right after event 2 was taken")
        for holder, engine in engines.items():
            applied = _wait_for(session, engine, account, lambda state: len(state.sequences) >= 2)
            final = applied or _applied(engine, account)
            # Both in the inbox and the last applied sequence 2: event 1 was applied first. Applied the other way
            # round, the last sequence would be 1, or event 1 would have been dropped as a replay of an older one.
            in_order = final.sequences == (1, 2) and final.last == 2 and final.held == 0
            yield Evidence(f"{holder} applies 1, then 2, once each", str(final), in_order)
    finally:
        for engine in engines.values():
            engine.dispose()


def _engine(session: Session, service: str) -> Engine:
    """SERVICE's own database as its own role (it reads its inbox; nobody else's)."""
    url = Postgres(session.ctx).sqlalchemy_url(service, session.ctx.credentials.postgres[service], service)
    return create_engine(url, poolclass=NullPool)


def _publish(session: Session, topic: str, record: bytes, account: str) -> None:
    delivery = session.publish(PRODUCER, topic, record, key=account.encode())
    if delivery.error is not None:
        raise LabSetupError(f"{PRODUCER} could not write to {topic}: {delivery.error.str()}")


def _wait_for(session: Session, engine: Engine, account: str, done: Callable[[Applied], bool]) -> Applied | None:
    """The consumer's view of ACCOUNT once DONE holds of it; None when the verdict wait is over first."""
    deadline = time.monotonic() + session.target.verdict_wait_seconds
    while not done(state := _applied(engine, account)):
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)
    return state


def _applied(engine: Engine, account: str) -> Applied:
    of_account = (inbox.c.producer == PRODUCER, inbox.c.aggregate_id == account)
    with engine.connect() as conn:
        sequences = tuple(conn.execute(select(inbox.c.sequence).where(*of_account).order_by(inbox.c.sequence))
                          .scalars())
        last = conn.execute(select(consumer_sequence.c.last_sequence).where(
            consumer_sequence.c.producer == PRODUCER, consumer_sequence.c.aggregate_id == account)).scalar()
        waiting = conn.execute(select(func.count()).select_from(held).where(
            held.c.producer == PRODUCER, held.c.aggregate_id == account)).scalar_one()
    return Applied(sequences, int(last or 0), int(waiting))
