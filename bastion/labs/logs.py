"""Output-encoding lab: text chosen by an attacker tries to forge a line of a service's log, or to put terminal
escape sequences in front of the operator who reads it.

Two ways in: a gRPC call whose correlation id carries forged fields (the server never echoes an id that is not
well formed, `bastion.grpc.context.correlation_id_from`), and an event whose claimed ids carry a line break, a
whole forged JSON line, a screen-clearing escape sequence and a right-to-left override (a refused event's claims
are logged only when well formed, `bastion.events.consumer.safe_claim`). Behind both, every service logs JSON
lines in which any such character is escaped (`bastion.service_logs`)."""

import uuid
from collections.abc import Iterator

import grpc

from bastion.accounts.v1 import accounts_pb2, accounts_pb2_grpc
from bastion.grpc.context import CORRELATION_HEADER
from bastion.labs.base import Evidence
from bastion.labs.events import ACCOUNTS_TOPIC, forged_deposit, inject
from bastion.labs.platform import TIMEOUT, LabSetupError, Session, Watch

LAB = "forged-log-line"
LOGS = ("accounts", "notifications", "audit")


def forged_log_line(session: Session) -> Iterator[Evidence]:
    marker = f"forged{uuid.uuid4().hex[:12]}"
    watch = session.watch()
    yield from _through_a_call(session, watch, marker)
    forged_line = f'{{"level":"info","event":"call_allowed","principal":"admin","note":"{marker}"}}'
    hostile = f"\n{forged_line}\n\x1b[2J\x1b[31m\u202e{marker}"
    envelope = forged_deposit(session, "accounts", ACCOUNTS_TOPIC, 100, correlation_id=hostile)
    envelope.event_id = hostile
    yield Evidence("the event", "a MoneyDeposited whose event id and correlation id are a line break, a whole forged "
                   "log line, a clear-screen escape sequence and a right-to-left override")
    # Logged and kept in the audit log with the claims replaced: found by the correlation id "(malformed)".
    yield from inject(session, ACCOUNTS_TOPIC, "accounts", envelope.SerializeToString(), "malformed", "(malformed)")
    for service in LOGS:
        yield untouched_since(service, watch.new_text(service), marker)


def _through_a_call(session: Session, watch: Watch, marker: str) -> Iterator[Evidence]:
    """Bob, who may not deposit, calls Deposit with a correlation id that would add fields to the refusal's line."""
    offered = f'lab" principal=admin event=call_allowed note={marker}'
    stub = accounts_pb2_grpc.AccountsStub(session.channel("accounts"))  # type: ignore[no-untyped-call]
    try:
        stub.Deposit(accounts_pb2.DepositRequest(account_id=str(uuid.uuid4()), amount_minor=1,
                                                 idempotency_key=f"lab-{uuid.uuid4()}"),
                     metadata=session.as_user("bob", offered), timeout=TIMEOUT)
    except grpc.RpcError as error:
        code = error.code()
        trailing = dict(error.trailing_metadata() or ())
    else:
        raise LabSetupError("bob's Deposit was accepted: the lab needs a call the policy refuses")
    if code != grpc.StatusCode.PERMISSION_DENIED:
        raise LabSetupError(f"bob's Deposit ended {code.name}, not PERMISSION_DENIED")
    given = str(trailing.get(CORRELATION_HEADER, ""))
    yield Evidence("bob's Deposit, correlation id " + repr(offered), f"PERMISSION_DENIED; the server answered with "
                   f"correlation id {given or '(none)'} of its own", bool(given) and given != offered)
    for line in watch.log_lines("accounts", "call_refused", given)[:1]:
        yield Evidence("accounts.log", line)


def untouched_since(service: str, written: str, marker: str) -> Evidence:
    """SERVICE's log since the lab began: no line holds the marker, and no character of it is a control
    character (but the line ends) or a direction override. A log that gained no line cannot tell."""
    controls = sorted({f"U+{ord(char):04X}" for char in written if char != "\n" and (
        not char.isprintable() or char in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")})
    lines = written.count("\n")
    if marker in written:
        return Evidence(f"{service}.log since the lab began", f"the attacker's text {marker} is in it", False)
    if controls:
        return Evidence(f"{service}.log since the lab began", f"raw {', '.join(controls)} in it", False)
    if not lines:
        # Each of these logs holds at least the refusal of the lab's own call or event: nothing new means the log
        # was missing, rotated or cut since the lab began, not that it kept the attacker's text out.
        raise LabSetupError(f"{service}.log gained no line since the lab began (missing, rotated or cut?): "
                            "the lab cannot tell")
    return Evidence(f"{service}.log since the lab began",
                    f"{lines} new line(s): none holds the attacker's text, no raw control character", True)
