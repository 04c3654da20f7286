"""Why an event was refused: one reason per pipeline step, used in the DLQ record, the log and the metric."""

from enum import StrEnum

from bastion.grpc.errors import InvalidArgumentError


class RejectReason(StrEnum):
    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    UNKNOWN_FIELDS = "unknown_fields"
    UNKNOWN_PRODUCER = "unknown_producer"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    TOPIC_MISMATCH = "topic_mismatch"
    NOT_AUTHORISED = "not_authorised"
    UNKNOWN_TYPE = "unknown_type"
    STALE = "stale"
    FROM_THE_FUTURE = "from_the_future"
    HANDLER_FAILED = "handler_failed"
    # Not a refusal of the event in hand: a gap in an aggregate's sequence stayed open, the events behind it held.
    SEQUENCE_GAP = "sequence_gap"


class EventsError(Exception):
    """Base of the signed-events kit's errors."""


class VerificationError(EventsError):
    """An event failed a step of the verification pipeline; it goes to the dead-letter topic."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class EventTooLargeError(EventsError, InvalidArgumentError):
    """An event would be larger than consumers accept: refused when it is written, with the state change that
    made it, rather than published and refused by every reader (or, over Kafka's largest record, stopping the
    relay). A request that causes it gets INVALID_ARGUMENT."""


class KeyNotFoundError(EventsError):
    """A producer has no usable signing key in the state folder."""


class TrustStoreUnavailableError(EventsError):
    """The trust store cannot be read: no event can be verified until it can (never a verdict on an event)."""
