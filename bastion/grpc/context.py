"""Who is calling, for the handlers: a frozen record in a ContextVar, set by the security interceptor."""

import contextvars
import re
import uuid
from dataclasses import dataclass, field

from bastion.grpc.tokens import Principal

CORRELATION_HEADER = "x-correlation-id"
VALID_CORRELATION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
SPIFFE_PREFIX = "spiffe://bastion.local/service/"


@dataclass(frozen=True)
class CallContext:
    correlation_id: str
    peer_identity: str | None
    principal: Principal | None
    method: str
    # The caller's bearer token, kept only in this process so calls made on the user's behalf can pass it on.
    bearer: str | None = field(default=None, repr=False)


current_call: contextvars.ContextVar[CallContext] = contextvars.ContextVar("bastion_current_call")


def correlation_id_from(metadata: dict[str, str]) -> str:
    """The caller's correlation id when it is well formed, else a fresh one (never echo arbitrary input)."""
    offered = metadata.get(CORRELATION_HEADER, "")
    return offered if VALID_CORRELATION_ID.match(offered) else str(uuid.uuid4())


def peer_identity_from(auth_context: dict[str, list[bytes]]) -> str | None:
    """The service NAME of the peer's certificate (SAN URI spiffe://bastion.local/service/NAME)."""
    for value in auth_context.get("peer_spiffe_id", []):
        text = value.decode(errors="replace")
        if text.startswith(SPIFFE_PREFIX) and "/" not in text[len(SPIFFE_PREFIX):]:
            return text[len(SPIFFE_PREFIX):]
    return None
