"""Before a producer's signing key (or a topic's data key) is retired: has every consumer read what the producer
wrote until now (and, for a data key, has the producer published every event it sealed)?

A retired key is refused by every running consumer within seconds (`bastion.events.keys.Followed`), so events
the producer signed with it and that some consumer has not read yet would be dead-lettered instead of applied.
`bastion keys retire` therefore waits for the consumer groups of the producer's topics (infra/event-access.yaml)
to read all that was written before it was asked, and refuses when they do not (or when it cannot tell).

The audit service's key also signs the log's checkpoints. Once retired, what it signed is no longer believed, so
its checkpoints count only when a later one of a trusted key covers them: the audit service signs one with its
new key within seconds of a rotation, and `bastion keys retire audit` waits for it (`unanchored_if_retired`)."""

import time

from sqlalchemy import create_engine, func, select

from bastion.audit.checkpoints import AUDIT_PRODUCER, CheckpointFile
from bastion.audit.errors import CheckpointError
from bastion.audit.install_tools import ORIGIN
from bastion.devstack.components.kafka import Kafka
from bastion.devstack.components.postgres import Postgres
from bastion.devstack.errors import DevstackError
from bastion.devstack.event_access import load_policy
from bastion.devstack.layout import StateLayout
from bastion.devstack.stack import Stack
from bastion.events.keys import KeyRing
from bastion.events.storage import outbox

UNREAD_WAIT_SECONDS = 15.0


def unread_by_consumers(stack: Stack, producer: str, wait_seconds: float = UNREAD_WAIT_SECONDS) -> list[str]:
    """What PRODUCER's consumers have still not read (`group on topic/partition`) after up to WAIT_SECONDS; none
    when all is read. DevstackError when Kafka is not running: nobody can tell then."""
    _require_running(stack, "kafka", f"whether every consumer has read what {producer} signed: Kafka",
                     "let the consumers catch up")
    ctx = stack.context()
    policy = load_policy(ctx.settings.infra_dir / "event-access.yaml", set(ctx.service_names))
    return Kafka(ctx).admin().wait_until_read(policy.readers_of(producer), wait_seconds)


def unpublished_by(stack: Stack, producer: str, topic: str, wait_seconds: float = UNREAD_WAIT_SECONDS) -> int:
    """How many events of TOPIC still wait in PRODUCER's outbox after up to WAIT_SECONDS (a running relay publishes
    them within a second): fields they carry were sealed when they were written, before any consumer can read them.
    DevstackError when PostgreSQL is not running: nobody can tell then."""
    _require_running(stack, "postgres", f"whether {producer} has published every event of {topic}: PostgreSQL",
                     "let the relays publish")
    ctx = stack.context()
    engine = create_engine(Postgres(ctx).sqlalchemy_url(producer, ctx.credentials.postgres[producer], producer))
    waiting = select(func.count()).select_from(outbox).where(outbox.c.topic == topic, outbox.c.sent_at.is_(None))
    deadline = time.monotonic() + wait_seconds
    try:
        while True:
            with engine.connect() as conn:
                count = int(conn.execute(waiting).scalar_one())
            if not count or time.monotonic() >= deadline:
                return count
            time.sleep(0.5)
    finally:
        engine.dispose()


def _require_running(stack: Stack, component: str, question: str, then: str) -> None:
    """DevstackError unless COMPONENT runs: without it nobody can tell QUESTION (`whether ...: NAME`)."""
    status = stack.status()["components"].get(component)
    if not status or not status["healthy"]:
        raise DevstackError(f"cannot tell {question} is not running",
                            f"start the stack (`bastion up`), {then} and retire again; or add --force")


def unanchored_if_retired(layout: StateLayout, key_id: str, wait_seconds: float | None = None,
                          poll_seconds: float = 0.5) -> str | None:
    """Why retiring the audit key KEY_ID would leave checkpoints that no trusted key vouches for (`bastion audit
    verify` would then fail), after waiting up to WAIT_SECONDS (default UNREAD_WAIT_SECONDS) for the audit service
    to sign with its new key; None when retiring it leaves every checkpoint covered. A checkpoint file that does
    not verify now, before this retirement, is said at once (what is wrong with it is not this key's anchor)."""
    deadline = time.monotonic() + (UNREAD_WAIT_SECONDS if wait_seconds is None else wait_seconds)
    while True:
        trust = KeyRing(layout.event_keys_dir).trust_store()
        try:
            CheckpointFile(layout.audit_checkpoints_file, trust, ORIGIN).load()
        except CheckpointError as error:
            return f"the checkpoint file does not verify now: {error}"
        try:
            CheckpointFile(layout.audit_checkpoints_file, trust.retiring(AUDIT_PRODUCER, key_id), ORIGIN).load()
            return None
        except CheckpointError as error:
            if time.monotonic() >= deadline:
                return str(error)
        time.sleep(poll_seconds)
