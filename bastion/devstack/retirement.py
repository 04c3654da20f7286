"""Before a producer's signing key is retired: has every consumer read what the producer wrote until now?

A retired key is refused by every running consumer within seconds (`bastion.events.keys.Followed`), so events
the producer signed with it and that some consumer has not read yet would be dead-lettered instead of applied.
`bastion keys retire` therefore waits for the consumer groups of the producer's topics (infra/event-access.yaml)
to read all that was written before it was asked, and refuses when they do not (or when it cannot tell)."""

from bastion.devstack.components.kafka import Kafka
from bastion.devstack.errors import DevstackError
from bastion.devstack.event_access import load_policy
from bastion.devstack.stack import Stack

UNREAD_WAIT_SECONDS = 15.0


def unread_by_consumers(stack: Stack, producer: str, wait_seconds: float = UNREAD_WAIT_SECONDS) -> list[str]:
    """What PRODUCER's consumers have still not read (`group on topic/partition`) after up to WAIT_SECONDS; none
    when all is read. DevstackError when Kafka is not running: nobody can tell then."""
    kafka = stack.status()["components"].get("kafka")
    if not kafka or not kafka["healthy"]:
        raise DevstackError(
            f"cannot tell whether every consumer has read what {producer} signed: Kafka is not running",
            "start the stack (`bastion up`), let the consumers catch up and retire again; or add --force")
    ctx = stack.context()
    policy = load_policy(ctx.settings.infra_dir / "event-access.yaml", set(ctx.service_names))
    return Kafka(ctx).admin().wait_until_read(policy.readers_of(producer), wait_seconds)
