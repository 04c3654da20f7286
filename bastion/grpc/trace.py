"""W3C Trace Context (https://www.w3.org/TR/trace-context/): each call the kit serves is a span of its caller's
trace, and the calls it makes downstream are children of that span.

A call's `traceparent` header (`00-<trace id>-<caller's span id>-<flags>`) is read when it is well formed by the
recommendation's rules and sent once; otherwise the call starts a trace of its own, and the caller's `tracestate`
is dropped with it (a `tracestate` travels only with the `traceparent` it belongs to). Several `tracestate`
headers are one list; a malformed list is dropped whole, one too long loses members as the recommendation says.
The call gets a span id of its own, which downstream calls name as their parent. The trace id is logged with
every refusal (`trace_id`), so the log lines of one request can be joined across services with any tracing
tool's ids, beside the correlation id.

The spans of sampled traces are recorded with OpenTelemetry's SDK (bastion/grpc/spans.py); a trace that is not
sampled costs only what this module does.
"""

import os
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# version-traceid-parentid-flags, lower-case hex. Version 00 is exactly this; a later version may append fields
# after a dash, which a version-00 reader ignores (the recommendation's rule for versions it does not know).
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_INVALID_VERSION = "ff"
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
SAMPLED = 0x01  # the only flag version 00 defines; the others are not passed on
# tracestate: at most 32 list members `key=value`. Over 512 characters, members longer than 128 go first, then
# members from the end, until it fits (the recommendation's order). A malformed list is dropped whole.
MAX_TRACESTATE = 512
MAX_TRACESTATE_MEMBERS = 32
LONG_TRACESTATE_MEMBER = 128
_TRACESTATE_MEMBER = re.compile(
    r"(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")


@dataclass(frozen=True, slots=True)
class TraceContext:
    trace_id: str  # 32 lower-case hex digits, never all zeros
    span_id: str  # this call's span: 16 lower-case hex digits, never all zeros
    parent_id: str | None  # the caller's span, when the call continued its trace
    sampled: bool  # the caller's sampled flag, passed on as it came
    state: str = ""  # the caller's tracestate, passed on unchanged ("" if none or malformed)

    def child_headers(self) -> tuple[tuple[str, str], ...]:
        """The headers of a call made on behalf of this one: same trace, this call's span as the parent."""
        parent = (TRACEPARENT, f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}")
        return (parent, (TRACESTATE, self.state)) if self.state else (parent,)


class _Ids:
    """Random trace and span ids from a generator seeded by the OS once per process (a forked child reseeds):
    ids must be unique, not secret, and a read of the OS's random source per call is a measurable cost."""

    def __init__(self) -> None:
        self._random = random.Random(os.urandom(32))  # noqa: S311 - unique ids, not secrets
        os.register_at_fork(after_in_child=lambda: self._random.seed(os.urandom(32)))

    def hex(self, digits: int) -> str:
        while True:
            value = self._random.getrandbits(digits * 4)
            if value:  # all zeros is an invalid id
                return f"{value:0{digits}x}"


_ids = _Ids()


def parse_traceparent(header: str) -> tuple[str, str, bool] | None:
    """(trace id, parent span id, sampled) of a well-formed `traceparent`, else None."""
    match = _TRACEPARENT.match(header)
    if match is None:
        return None
    version, trace_id, parent_id, flags = match.groups()
    if version == _INVALID_VERSION or trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    rest = header[match.end():]
    if rest and (version == "00" or not rest.startswith("-")):
        return None  # version 00 has exactly four fields; a later version's extra fields follow a dash
    return trace_id, parent_id, bool(int(flags, 16) & SAMPLED)


def valid_tracestate(header: str) -> str:
    """The `tracestate` the kit passes on for HEADER: its members without optional white space, cut to 512
    characters; "" when HEADER is empty or malformed."""
    members = [member.strip(" \t") for member in header.split(",")]
    members = [member for member in members if member]
    if not members or len(members) > MAX_TRACESTATE_MEMBERS:
        return ""
    if not all(_TRACESTATE_MEMBER.fullmatch(member) for member in members):
        return ""
    keys = [member.partition("=")[0] for member in members]
    if len(set(keys)) != len(keys):  # each key at most once: a list naming one twice is malformed, dropped whole
        return ""
    if len(",".join(members)) > MAX_TRACESTATE:
        members = [member for member in members if len(member) <= LONG_TRACESTATE_MEMBER]
        while members and len(",".join(members)) > MAX_TRACESTATE:
            members.pop()
    return ",".join(members)


def trace_context_from(received: Iterable[tuple[str, str | bytes]]) -> TraceContext:
    """This call's span, from the call's metadata RECEIVED: a child of the caller's when it sent one well-formed
    `traceparent`, else a new trace's root."""
    parents: list[str | bytes] = []
    states: list[str | bytes] = []
    for key, value in received:
        if key == TRACEPARENT:
            parents.append(value)
        elif key == TRACESTATE:
            states.append(value)
    parent = parse_traceparent(parents[0]) if len(parents) == 1 and isinstance(parents[0], str) else None
    if parent is None:
        return TraceContext(_ids.hex(32), _ids.hex(16), None, False)
    trace_id, parent_id, sampled = parent
    state = "" if not all(isinstance(value, str) for value in states) else valid_tracestate(
        ",".join(str(value) for value in states))
    return TraceContext(trace_id, _ids.hex(16), parent_id, sampled, state)
