"""The audit gRPC servicer on a fake of its handlers: every filter of a ListEvents request reaches the query, a
query the service cannot answer is refused before anything is read, each log entry goes out with every field it
has, and a chain verdict is passed on as it is."""

import asyncio
import base64
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import pytest

from bastion.audit.chain import EMPTY, LogEntry, extend
from bastion.audit.v1 import audit_pb2
from bastion.audit.verify import ChainReport
from bastion.grpc.errors import InvalidArgumentError
from services.audit import domain
from services.audit.adapters.grpc import AuditServicer
from services.audit.domain import EventQuery, InvalidQueryError
from services.audit.handlers import Verdict
from tests.unit.audit.samples import sample_record

SINCE = dt.datetime(2026, 3, 1, 9, 0, tzinfo=dt.UTC)
UNTIL = dt.datetime(2026, 3, 1, 11, 0, tzinfo=dt.UTC)


@dataclass
class Handlers:
    entries: list[LogEntry] = field(default_factory=list)
    verdict: Verdict | None = None
    queries: list[EventQuery] = field(default_factory=list)

    def list_events(self, query: EventQuery) -> tuple[list[LogEntry], str]:
        self.queries.append(query)
        return self.entries, "next-page"

    def verify_chain(self) -> Verdict:
        assert self.verdict is not None
        return self.verdict


def call(rpc: Any) -> Any:
    return asyncio.run(rpc)


def test_every_filter_of_a_request_reaches_the_query() -> None:
    handlers = Handlers()
    request = audit_pb2.ListEventsRequest(aggregate_id="acc-1", principal="alice", event_type="bastion.T",
                                          page_size=7, page_token=domain.page_token(12), refusals_only=True,
                                          correlation_id="corr-9")
    request.since.FromDatetime(SINCE)
    request.until.FromDatetime(UNTIL)
    response = call(AuditServicer(handlers).ListEvents(request, None))  # type: ignore[arg-type]
    assert handlers.queries == [EventQuery("acc-1", "alice", "bastion.T", SINCE, UNTIL, 7, 12, True, "corr-9")]
    assert response.next_page_token == "next-page"


def test_a_request_without_a_window_asks_for_the_whole_log() -> None:
    handlers = Handlers()
    call(AuditServicer(handlers).ListEvents(audit_pb2.ListEventsRequest(), None))  # type: ignore[arg-type]
    assert handlers.queries == [EventQuery()]
    until_only = audit_pb2.ListEventsRequest()
    until_only.until.FromDatetime(UNTIL)
    call(AuditServicer(handlers).ListEvents(until_only, None))  # type: ignore[arg-type]
    assert (handlers.queries[-1].since, handlers.queries[-1].until) == (None, UNTIL)


def test_a_query_the_service_cannot_answer_is_refused_before_anything_is_read() -> None:
    handlers = Handlers()
    backwards = audit_pb2.ListEventsRequest(page_token="not-a-token")
    with pytest.raises(InvalidArgumentError, match="page_token"):
        call(AuditServicer(handlers).ListEvents(backwards, None))  # type: ignore[arg-type]
    assert handlers.queries == []


def test_each_entry_goes_out_with_every_field_it_has() -> None:
    denied, event = extend(EMPTY, [sample_record(1, "access", principal="mallory", decision="deny"),
                                   sample_record(2)])
    response = call(AuditServicer(Handlers([denied, event])).ListEvents(
        audit_pb2.ListEventsRequest(), None))  # type: ignore[arg-type]
    sent, plain = response.events
    record = denied.record
    assert (sent.seq, sent.kind, sent.topic, sent.event_id, sent.event_type, sent.producer, sent.aggregate_id) == (
        1, "access", record.topic, record.event_id, record.event_type, record.producer, record.aggregate_id)
    assert (sent.principal, sent.decision, sent.reason, sent.action, sent.detail, sent.correlation_id) == (
        "mallory", "deny", "not_owner", "/bastion.accounts.v1.Accounts/GetAccount",
        "spiffe://bastion.local/service/gateway", "corr-1")
    assert sent.occurred_at.ToDatetime(dt.UTC) == record.occurred_at
    assert sent.recorded_at.ToDatetime(dt.UTC) == record.recorded_at
    assert (sent.hash, sent.envelope) == (denied.hash, record.envelope)
    assert (plain.seq, plain.kind, plain.principal, plain.decision, plain.reason, plain.action, plain.detail) == (
        2, "event", "", "", "", "", "")


def test_a_chain_verdict_is_passed_on_as_it_is() -> None:
    broken = Verdict(ChainReport(False, 3, b"\x03" * 32, 4, "record 4 was changed", 2), 3)
    response = call(AuditServicer(Handlers(verdict=broken)).VerifyChain(
        audit_pb2.VerifyChainRequest(), None))  # type: ignore[arg-type]
    assert (response.ok, response.length, response.head_hash, response.first_bad_seq, response.reason,
            response.checkpoint_length) == (False, 3, b"\x03" * 32, 4, "record 4 was changed", 3)
    whole = Verdict(ChainReport(True, 9, b"\x09" * 32, None, "9 records verified", 5), 8, published=6)
    response = call(AuditServicer(Handlers(verdict=whole)).VerifyChain(
        audit_pb2.VerifyChainRequest(), None))  # type: ignore[arg-type]
    assert (response.ok, response.length, response.first_bad_seq, response.checkpoint_length,
            response.published_checkpoints) == (True, 9, 0, 8, 6)


@pytest.mark.parametrize(("name", "seconds", "nanos"), [("since", 2**62, 0), ("until", -(2**40), 0),
                                                        ("since", 0, -1), ("until", 0, 2_000_000_000)])
def test_a_time_out_of_a_timestamps_range_is_an_invalid_argument_naming_it(name: str, seconds: int,
                                                                          nanos: int) -> None:
    """protobuf's ToDatetime raises ValueError for it, which the error table would answer INTERNAL."""
    handlers = Handlers()
    request = audit_pb2.ListEventsRequest()
    getattr(request, name).seconds = seconds
    getattr(request, name).nanos = nanos
    with pytest.raises(InvalidQueryError, match=name):
        call(AuditServicer(handlers).ListEvents(request, None))  # type: ignore[arg-type]
    assert handlers.queries == []


@pytest.mark.parametrize("position", [b"9223372036854775808", b"9" * 40])
def test_a_forged_page_token_beyond_the_logs_bigint_is_an_invalid_argument(position: bytes) -> None:
    """The position is compared with a bigint in the query: PostgreSQL would fail it ("bigint out of range")."""
    handlers = Handlers()
    forged = base64.urlsafe_b64encode(b"seq:" + position).decode()
    with pytest.raises(InvalidArgumentError, match="page_token"):
        call(AuditServicer(handlers).ListEvents(audit_pb2.ListEventsRequest(page_token=forged), None))  # type: ignore[arg-type]
    assert handlers.queries == []
    assert domain.after_seq_of(domain.page_token(domain.MAX_SEQ)) == 2**63 - 1


@pytest.mark.parametrize("name", ["aggregate_id", "principal", "event_type", "correlation_id"])
def test_a_nul_in_a_text_filter_is_an_invalid_argument_naming_it(name: str) -> None:
    """psycopg refuses to send a NUL in text ("PostgreSQL text fields cannot contain NUL"), which is INTERNAL."""
    handlers = Handlers()
    with pytest.raises(InvalidQueryError, match=name):
        call(AuditServicer(handlers).ListEvents(audit_pb2.ListEventsRequest(**{name: "acc\x001"}), None))  # type: ignore[arg-type]
    assert handlers.queries == []
