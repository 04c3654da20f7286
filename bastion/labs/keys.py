"""Key-compromise lab: a producer's signing key leaks. The operator rotates it and retires the leaked key while
the platform runs, as `bastion keys` does; the thief's events are then refused by every consumer, and no service
was restarted for it (running services follow the key ring: `KeyRing.followed_trust_store`,
`KeyRing.followed_signing_key`).

This lab changes the install for real, as the drill it is: the producer gets a new signing key and the leaked
one stays retired (`bastion keys list` shows both)."""

import time
from collections.abc import Iterator

from bastion.devstack.event_access import load_policy
from bastion.events.keys import FOLLOW_CHECK_SECONDS
from bastion.labs.bank import Bank, euros
from bastion.labs.base import Evidence
from bastion.labs.events import (
    ACCOUNTS_TOPIC,
    DEPOSITED,
    first_event,
    forged_deposit,
    inject,
    last_notification,
    times_told,
)
from bastion.labs.platform import LabSetupError, Session, TopicTail, new_correlation_id
from bastion.notifications.v1 import notifications_pb2_grpc

LAB = "leaked-signing-key"
PRODUCER = "accounts"
# Long enough for every running service to have looked at the key ring once since it changed.
FOLLOW_WAIT_SECONDS = FOLLOW_CHECK_SECONDS + 1.0


def leaked_signing_key(session: Session) -> Iterator[Evidence]:
    ring = session.key_ring()
    leaked = ring.signing_key(PRODUCER)
    yield Evidence("the leak", f"a copy of {PRODUCER}' active signing key {leaked.key_id} and of its Kafka "
                   "credentials, as anyone who read the state folder of a compromised host holds them")
    new_key = ring.rotate(PRODUCER)
    yield Evidence(f"the response, step 1: `bastion keys rotate {PRODUCER}`",
                   f"new active key {new_key}; {leaked.key_id} verify-only, so events in flight still verify")
    time.sleep(FOLLOW_WAIT_SECONDS)
    bank = Bank(session, LAB)
    inbox = notifications_pb2_grpc.NotificationsStub(session.channel("notifications"))  # type: ignore[no-untyped-call]
    last_seen = last_notification(session, inbox, LAB)
    account = bank.open_account("bob")
    wait = session.target.verdict_wait_seconds
    tail = TopicTail(session, ACCOUNTS_TOPIC)  # where the producer itself publishes (a route may be a stand-in's)
    try:
        bank.deposit(account, 100, new_correlation_id(LAB))
        _, _, genuine = first_event(tail, account, DEPOSITED, wait)
    finally:
        tail.close()
    yield Evidence(f"{PRODUCER}' next event, no service restarted",
                   f"{DEPOSITED} {genuine.event_id} signed with {genuine.key_id}", genuine.key_id == new_key)
    if genuine.key_id != new_key:
        return  # retiring now would refuse the producer's own events: the drill stops with the old key verify-only
    yield from _read_past_the_rotation(session, wait)
    told = times_told(session, inbox, genuine.event_id, last_seen, wait=True, lab=LAB)
    yield Evidence("bob's notifications", f"told {told} time(s) of that deposit: the new key is believed",
                   told == 1)
    ring.retire(PRODUCER, leaked.key_id)
    yield Evidence(f"step 2: `bastion keys retire {PRODUCER} {leaked.key_id}`",
                   "retired in the trust store, its private key deleted from the key ring")
    time.sleep(FOLLOW_WAIT_SECONDS)
    correlation_id = new_correlation_id(LAB)
    forged = forged_deposit(session, PRODUCER, ACCOUNTS_TOPIC, 100_000_000, correlation_id, key=leaked)
    yield Evidence("the attack", f"a {DEPOSITED} of {euros(100_000_000)} signed with the leaked key, published "
                   f"with {PRODUCER}' stolen Kafka credentials")
    yield from inject(session, ACCOUNTS_TOPIC, PRODUCER, forged.SerializeToString(), "unknown_key", correlation_id)


def _read_past_the_rotation(session: Session, wait: float) -> Iterator[Evidence]:
    """Wait until every consumer group of the producer's topics has read all that was written before now, so
    that nothing the producer signed with the old key is left unread when it is retired (what an operator
    checks before `bastion keys retire`)."""
    policy = load_policy(session.ctx.settings.infra_dir / "event-access.yaml", set(session.ctx.service_names))
    groups = policy.readers_of(PRODUCER)
    behind = session.behind(groups, wait)
    if behind:
        raise LabSetupError(f"the consumers did not read past the rotation within {wait:.0f}s "
                            f"({', '.join(behind)}): the old key was left verify-only")
    yield Evidence("before retiring", f"every consumer group of {', '.join(sorted(groups))} has read past the "
                   "rotation: nothing signed with the old key is left unread")
