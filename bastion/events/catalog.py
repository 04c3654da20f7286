"""The event types the platform knows: their payload classes, current schema versions and upcasters.

A consumer reads the previous schema version of an event by upcasting it on read: the upcaster turns the
old payload into the current message, so handlers only ever see current events.
"""

from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.message import Message

from bastion.access.v1 import decision_pb2
from bastion.accounts.v1 import events_pb2 as accounts_events
from bastion.payments.v1 import events_pb2 as payments_events

Upcaster = Callable[[Message], Message]


@dataclass(frozen=True)
class EventSchema:
    message: type[Message]
    current_version: int
    # upcasters[v] turns a payload of version v into one of version v + 1
    upcasters: dict[int, Upcaster]

    @property
    def event_type(self) -> str:
        return str(self.message.DESCRIPTOR.full_name)


def _deposit_v1_to_v2(payload: Message) -> Message:
    """Version 1 deposits predate multi-currency accounts: every one of them was in euros."""
    upgraded = accounts_events.MoneyDeposited()
    upgraded.ParseFromString(payload.SerializeToString())
    if not upgraded.currency:
        upgraded.currency = "EUR"
    return upgraded


SCHEMAS: dict[str, EventSchema] = {
    schema.event_type: schema
    for schema in [
        EventSchema(accounts_events.AccountOpened, 1, {}),
        EventSchema(accounts_events.MoneyDeposited, 2, {1: _deposit_v1_to_v2}),
        EventSchema(accounts_events.AccountFrozen, 1, {}),
        EventSchema(accounts_events.TransferApplied, 1, {}),
        EventSchema(payments_events.PaymentCompleted, 1, {}),
        EventSchema(payments_events.PaymentFailed, 1, {}),
        EventSchema(decision_pb2.AccessDecision, 1, {}),
        EventSchema(decision_pb2.EventRejected, 1, {}),
        EventSchema(decision_pb2.SecurityAlert, 1, {}),
        EventSchema(decision_pb2.AccessRevoked, 1, {}),
        EventSchema(decision_pb2.RevocationsCurrent, 1, {}),
    ]
}
