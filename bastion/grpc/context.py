"""Who is calling, for the handlers: a frozen record in a ContextVar, set by the security interceptor."""

import contextvars
import itertools
import os
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


class _CorrelationIds:
    """Fresh correlation ids: this process's random UUID, then a call number (`<uuid>.<n>`, at most 53 characters).

    Unique without a random read per call (on this VM, `uuid.uuid4()`'s getrandom syscall was the largest
    single cost of the interceptor's checks). A correlation id is a label for tracing, not a secret: the
    caller may send any well-formed one. A forked child starts its own series."""

    def __init__(self) -> None:
        self._restart()
        os.register_at_fork(after_in_child=self._restart)

    def _restart(self) -> None:
        self._prefix = str(uuid.uuid4())
        self._numbers = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}.{next(self._numbers)}"


_fresh_ids = _CorrelationIds()


def correlation_id_from(metadata: dict[str, str]) -> str:
    """The caller's correlation id when it is well formed, else a fresh one (never echo arbitrary input)."""
    offered = metadata.get(CORRELATION_HEADER, "")
    return offered if VALID_CORRELATION_ID.match(offered) else _fresh_ids.next()


def peer_identity_from(auth_context: dict[str, list[bytes]]) -> str | None:
    """The service NAME of the peer's certificate (SAN URI spiffe://bastion.local/service/NAME)."""
    for value in auth_context.get("peer_spiffe_id", []):
        text = value.decode(errors="replace")
        if text.startswith(SPIFFE_PREFIX) and "/" not in text[len(SPIFFE_PREFIX):]:
            return text[len(SPIFFE_PREFIX):]
    return None
