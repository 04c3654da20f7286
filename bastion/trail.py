"""`bastion trail CORRELATION_ID`: one request followed through the platform, in time order: every line a service
logged with its correlation id (the JSON lines of `bastion.service_logs`), every span a service recorded for it
(when its trace was sampled: `bastion.grpc.spans`) and every audit record that carries it (access decisions,
events, rejections, read from the audit service as its auditor)."""

import datetime as dt
import json
from dataclasses import dataclass

from bastion.audit.refusals import carrying
from bastion.audit.v1 import audit_pb2
from bastion.devstack.context import StackContext
from bastion.grpc.spans import milliseconds, started_at, written_spans
from bastion.service_logs import render


@dataclass(frozen=True, order=True)
class Step:
    at: dt.datetime
    source: str
    text: str


def trail(ctx: StackContext, correlation_id: str, minutes: float | None, limit: int) -> list[Step]:
    return sorted([*logged(ctx, correlation_id), *spanned(ctx, correlation_id),
                   *(audited(record) for record in carrying(ctx, correlation_id, minutes, limit))])


def logged(ctx: StackContext, correlation_id: str) -> list[Step]:
    """The lines of every service's log whose `correlation_id` is CORRELATION_ID (other lines, and lines that are
    not JSON, are passed over)."""
    steps = []
    for service in ctx.service_names:
        path = ctx.layout.log_file(service)
        if not path.exists():
            continue
        with path.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if correlation_id not in line:
                    continue
                try:
                    record = json.loads(line)
                    at = dt.datetime.fromisoformat(str(record["timestamp"]))
                except (ValueError, KeyError, TypeError):
                    continue
                if isinstance(record, dict) and record.get("correlation_id") == correlation_id:
                    steps.append(Step(at, f"{service}.log", render(record)))
    return steps


def spanned(ctx: StackContext, correlation_id: str) -> list[Step]:
    """The spans the services recorded for calls carrying CORRELATION_ID, at their start."""
    steps = []
    for service, span in written_spans(ctx.layout.log_dir, ctx.service_names, correlation_id):
        attributes = span.get("attributes")
        if not isinstance(attributes, dict) or attributes.get("bastion.correlation_id") != correlation_id:
            continue
        try:
            at, lasted = started_at(span), milliseconds(span)
        except (KeyError, TypeError, ValueError):
            continue
        outcome = (f"code {attributes['rpc.grpc.status_code']}" if "rpc.grpc.status_code" in attributes
                   else f"{attributes.get('bastion.event_type', '?')} {(span.get('status') or {}).get('status_code')}")
        kind = "span"
        if span.get("kind") == "SpanKind.CLIENT":  # a call this service made downstream, retries included
            kind, outcome = f"call to {attributes.get('server.address', '?')}", (
                f"{outcome}, {attributes.get('bastion.attempts', '?')} attempt(s)")
        steps.append(Step(at, f"{service}.spans", (
            f"{kind} {span.get('name')} {lasted:.1f} ms, {outcome}, trace "
            f"{str(span['context'].get('trace_id', '')).removeprefix('0x')} span "
            f"{str(span['context'].get('span_id', '')).removeprefix('0x')} parent "
            f"{str(span.get('parent_id') or '-').removeprefix('0x')}")))
    return steps


def audited(record: audit_pb2.AuditEvent) -> Step:
    what = {
        "access": f"{record.principal} {record.action}: {record.decision} ({record.reason})",
        "event": f"{record.producer} {record.event_type} of {record.aggregate_id}",
        "rejection": f"{record.producer or '?'} {record.event_type or '?'} refused: {record.reason} {record.detail}",
    }.get(record.kind, record.kind)
    return Step(record.occurred_at.ToDatetime(dt.UTC), f"audit seq {record.seq}", printable(f"{record.kind}: {what}"))


def printable(text: str) -> str:
    """TEXT with anything but printable ASCII escaped (`\\x1b`, `\\n`, `\\u202e`): an audit record keeps a caller's
    text as it came (an access decision's method is the path the caller sent, escape sequences and line breaks
    included), and the trail goes to an operator's terminal, as the service logs' escaped lines do."""
    return text if text.isascii() and text.isprintable() else text.encode("unicode_escape").decode("ascii")
