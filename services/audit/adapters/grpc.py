"""The audit gRPC servicer: parse the request, call the handler (in a worker thread: it reads the database),
translate back. Nothing else."""

import asyncio
import datetime as dt

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from bastion.audit.chain import LogEntry
from bastion.audit.v1 import audit_pb2, audit_pb2_grpc
from services.audit import domain
from services.audit.domain import InvalidQueryError
from services.audit.handlers import AuditHandlers


def _timestamp(moment: dt.datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _window(request: audit_pb2.ListEventsRequest) -> tuple[dt.datetime | None, dt.datetime | None]:
    since = _moment(request.since, "since") if request.HasField("since") else None
    until = _moment(request.until, "until") if request.HasField("until") else None
    return since, until


def _moment(stamp: Timestamp, name: str) -> dt.datetime:
    try:
        return stamp.ToDatetime(dt.UTC)
    except ValueError:  # seconds or nanos out of a Timestamp's range: the caller's mistake, not a fault (INTERNAL)
        raise InvalidQueryError(f"{name} is not a valid time (years 1 to 9999, nanos 0 to 999999999)") from None


def _event(entry: LogEntry) -> audit_pb2.AuditEvent:
    record = entry.record
    return audit_pb2.AuditEvent(
        seq=entry.seq, kind=record.kind.value, topic=record.topic, event_id=record.event_id,
        event_type=record.event_type, producer=record.producer, aggregate_id=record.aggregate_id,
        principal=record.principal or "", decision=record.decision.value if record.decision else "",
        reason=record.reason or "", correlation_id=record.correlation_id,
        occurred_at=_timestamp(record.occurred_at), recorded_at=_timestamp(record.recorded_at), hash=entry.hash,
        envelope=record.envelope, action=record.action or "", detail=record.detail or "")


class AuditServicer(audit_pb2_grpc.AuditServicer):
    def __init__(self, handlers: AuditHandlers) -> None:
        self.handlers = handlers

    async def ListEvents(self, request: audit_pb2.ListEventsRequest, context: grpc.aio.ServicerContext
                         ) -> audit_pb2.ListEventsResponse:
        since, until = _window(request)
        query = domain.query(request.aggregate_id, request.principal, request.event_type, since, until,
                             request.page_size, request.page_token, request.refusals_only, request.correlation_id)
        entries, next_token = await asyncio.to_thread(self.handlers.list_events, query)
        return audit_pb2.ListEventsResponse(events=[_event(e) for e in entries], next_page_token=next_token)

    async def VerifyChain(self, request: audit_pb2.VerifyChainRequest, context: grpc.aio.ServicerContext
                          ) -> audit_pb2.VerifyChainResponse:
        verdict = await asyncio.to_thread(self.handlers.verify_chain)
        report = verdict.report
        return audit_pb2.VerifyChainResponse(ok=report.ok, length=report.length, head_hash=report.head_hash,
                                             first_bad_seq=report.first_bad_seq or 0, reason=report.reason,
                                             checkpoint_length=verdict.checkpoint_length,
                                             published_checkpoints=verdict.published)
