"""Who is calling, for the handlers: a frozen record in a ContextVar, set by the security interceptor."""

import contextvars
import itertools
import os
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bastion.grpc.names import SPIFFE_PREFIX
from bastion.grpc.tokens import Principal
from bastion.grpc.trace import TraceContext

CORRELATION_HEADER = "x-correlation-id"
VALID_CORRELATION_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
SERVICE_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")
# How much of a call's method path is kept in a verdict, a log line or an access decision: for a call to an unknown
# method the path is the caller's own text, of any length.
MAX_METHOD = 256
SAN_PROPERTY = "x509_subject_alternative_name"  # gRPC's peer identity property when the certificate has SANs


@dataclass(frozen=True)
class CallContext:
    correlation_id: str
    peer_identity: str | None
    principal: Principal | None
    method: str
    # The caller's bearer token, kept only in this process so calls made on the user's behalf can pass it on.
    bearer: str | None = field(default=None, repr=False)
    # This call's span of the caller's trace (W3C trace context), passed on to the calls made on its behalf.
    trace: TraceContext | None = None
    # The recorded span of this call (bastion/grpc/spans.py), when its trace is sampled; None otherwise.
    span: Any = field(default=None, repr=False, compare=False)


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
    return offered if VALID_CORRELATION_ID.fullmatch(offered) else _fresh_ids.next()


def peer_identity_from(identity_key: str | None, identities: Iterable[bytes] | None) -> str | None:
    """The service NAME of the peer's certificate: its one SAN URI spiffe://bastion.local/service/NAME.

    IDENTITY_KEY and IDENTITIES are how gRPC names the TLS peer (`context.peer_identity_key()`,
    `context.peer_identities()`): for a certificate with SANs, all of them (DNS names, addresses, URIs); for
    one without, its common name, which is never an identity here. Anything but exactly one spiffe:// name,
    that one a service of this trust domain, is no identity. Read this way rather than from
    `context.auth_context()`, which copies the whole certificate into Python on every call (10 µs, not 1.4)."""
    if identity_key != SAN_PROPERTY:
        return None
    # URI schemes are case-insensitive: a second name in another case is a second identity, refused with the first.
    spiffe = [value for value in identities or () if value[:9].lower() == b"spiffe://"]
    if len(spiffe) != 1:
        return None
    text = spiffe[0].decode(errors="replace")
    name = text[len(SPIFFE_PREFIX):] if text.startswith(SPIFFE_PREFIX) else ""
    return name if SERVICE_NAME.fullmatch(name) else None
