"""`bastion trail` (bastion/trail.py) on files in a scratch folder and a stand-in for the audit service: a request's
log lines, spans and audit records, merged in time order; lines of other requests, and lines that are not what
they should be, passed over."""

import datetime as dt
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from bastion import trail
from bastion.audit.v1 import audit_pb2

T0 = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
TRACE, CALLER = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


def context(log_dir: Path, *services: str) -> Any:
    """The part of a StackContext the trail reads: the services, their log files and span files."""
    return SimpleNamespace(service_names=list(services),
                           layout=SimpleNamespace(log_dir=log_dir, log_file=lambda name: log_dir / f"{name}.log"))


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def log_line(seconds: float, correlation_id: str, event: str = "call_served", **fields: object) -> str:
    stamp = at(seconds).isoformat().replace("+00:00", "Z")
    return json.dumps({"timestamp": stamp, "level": "info", "service": "accounts", "event": event,
                       "correlation_id": correlation_id, **fields})


def span_line(seconds: float, correlation_id: str, span_id: str, name: str = "bastion.accounts.v1.Accounts/GetAccount",
              parent: str | None = f"0x{CALLER}", lasted_ms: float = 2.5, without: str = "", **fields: object) -> str:
    span: dict[str, object] = {
        "name": name, "kind": "SpanKind.SERVER", "parent_id": parent,
        "context": {"trace_id": f"0x{TRACE}", "span_id": f"0x{span_id}"},
        "start_time": at(seconds).isoformat().replace("+00:00", "Z"),
        "end_time": (at(seconds) + dt.timedelta(milliseconds=lasted_ms)).isoformat().replace("+00:00", "Z"),
        "status": {"status_code": "UNSET"},
        "attributes": {"bastion.correlation_id": correlation_id, "rpc.grpc.status_code": 0}}
    span.update(fields)
    span.pop(without, None)
    return json.dumps(span)


def write(path: Path, *lines: str) -> None:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def record(seq: int, seconds: float, kind: str, **fields: str) -> audit_pb2.AuditEvent:
    occurred = Timestamp()
    occurred.FromDatetime(at(seconds))
    return audit_pb2.AuditEvent(seq=seq, kind=kind, occurred_at=occurred, correlation_id="corr-1", **fields)


class AuditLog:
    """Stands in for `bastion.audit.refusals.carrying` (the audit service asked as its auditor)."""

    def __init__(self, *records: audit_pb2.AuditEvent) -> None:
        self.records = list(records)
        self.asked: list[tuple[str, float | None, int]] = []

    def __call__(self, _ctx: object, correlation_id: str, minutes: float | None, limit: int
                 ) -> list[audit_pb2.AuditEvent]:
        self.asked.append((correlation_id, minutes, limit))
        return self.records


def test_a_trail_merges_log_lines_spans_and_audit_records_in_time_order(tmp_path: Path, monkeypatch) -> None:
    write(tmp_path / "payments.log", log_line(3, "corr-1", "transfer_done"), log_line(0, "corr-1", "transfer_asked"))
    write(tmp_path / "accounts.spans.jsonl", span_line(1, "corr-1", "a" * 16))
    audit = AuditLog(record(7, 2, "access", principal="alice", action="/bastion.payments.v1.Payments/Transfer",
                            decision="allow", reason="customer"))
    monkeypatch.setattr(trail, "carrying", audit)
    steps = trail.trail(context(tmp_path, "accounts", "payments"), "corr-1", 60, 100)
    assert [(step.at, step.source) for step in steps] == [
        (at(0), "payments.log"), (at(1), "accounts.spans"), (at(2), "audit seq 7"), (at(3), "payments.log")]
    assert steps[0].text.startswith("info: transfer_asked ")
    assert steps[2].text == "access: alice /bastion.payments.v1.Payments/Transfer: allow (customer)"
    assert audit.asked == [("corr-1", 60, 100)], "the window and the limit the operator asked for"


def test_a_trail_with_no_window_asks_the_audit_service_over_its_whole_log(tmp_path: Path, monkeypatch) -> None:
    audit = AuditLog()
    monkeypatch.setattr(trail, "carrying", audit)
    assert trail.trail(context(tmp_path, "accounts"), "corr-1", None, 5) == []
    assert audit.asked == [("corr-1", None, 5)]


def test_only_the_log_lines_of_the_request_are_in_its_trail(tmp_path: Path) -> None:
    write(tmp_path / "payments.log",
          log_line(1, "corr-1", "mine"),
          log_line(2, "corr-10", "a longer id that contains it"),
          log_line(3, "corr-2", "another request naming it", detail="after corr-1"),
          "not json, but about corr-1",
          json.dumps(["corr-1", "a list, not a log record"]),
          json.dumps({"correlation_id": "corr-1", "event": "no timestamp"}),
          json.dumps({"timestamp": "yesterday", "correlation_id": "corr-1", "event": "a timestamp that is not one"}),
          log_line(4, "corr-1", "also mine"))
    # accounts has no log file (never started): the other services' logs are read all the same
    steps = trail.logged(context(tmp_path, "accounts", "payments"), "corr-1")
    assert [(step.at, step.source) for step in steps] == [(at(1), "payments.log"), (at(4), "payments.log")]
    assert [step.text.split()[1] for step in steps] == ["mine", "also"]


def test_a_requests_spans_in_every_services_file_are_in_its_trail_and_spans_that_cannot_be_read_are_not(
        tmp_path: Path) -> None:
    write(tmp_path / "accounts.spans.jsonl",
          span_line(1, "corr-1", "a" * 16),
          span_line(2, "corr-10", "b" * 16),  # another request, whose id contains this one's
          span_line(3, "corr-1", "c" * 16, without="end_time"),
          span_line(4, "corr-1", "d" * 16, start_time=12),
          span_line(5, "corr-1", "e" * 16, start_time="the fifth second"),
          span_line(6, "corr-1", "f" * 16, attributes=["corr-1"]))
    write(tmp_path / "payments.spans.jsonl", span_line(7, "corr-1", "1" * 16, parent=None, lasted_ms=1250))
    steps = trail.spanned(context(tmp_path, "accounts", "payments"), "corr-1")
    assert [(step.at, step.source) for step in steps] == [(at(1), "accounts.spans"), (at(7), "payments.spans")]
    assert steps[1].text == (f"span bastion.accounts.v1.Accounts/GetAccount 1250.0 ms, code 0, trace {TRACE} span "
                             f"{'1' * 16} parent -"), "a span that starts a trace has no parent"


@pytest.mark.parametrize(("kind", "fields", "text"), [
    ("access", {"principal": "mallory", "action": "/bastion.accounts.v1.Accounts/Deposit", "decision": "deny",
                "reason": "role teller required"},
     "access: mallory /bastion.accounts.v1.Accounts/Deposit: deny (role teller required)"),
    ("event", {"producer": "payments", "event_type": "bastion.payments.v1.PaymentCompleted", "aggregate_id": "p-1"},
     "event: payments bastion.payments.v1.PaymentCompleted of p-1"),
    ("rejection", {"producer": "payments", "event_type": "bastion.payments.v1.PaymentCompleted",
                   "reason": "bad_signature", "detail": "payments.events.v1/0/12"},
     "rejection: payments bastion.payments.v1.PaymentCompleted refused: bad_signature payments.events.v1/0/12"),
    ("rejection", {"reason": "unparseable", "detail": "payments.events.v1/0/13"},
     "rejection: ? ? refused: unparseable payments.events.v1/0/13"),
    ("checkpoint", {}, "checkpoint: checkpoint"),
])
def test_an_audit_record_reads_as_what_it_records(kind: str, fields: dict[str, str], text: str) -> None:
    step = trail.audited(record(12, 5, kind, **fields))
    assert (step.at, step.source, step.text) == (at(5), "audit seq 12", text)


def test_a_callers_text_in_an_audit_record_reaches_the_trail_escaped() -> None:
    # The access audit keeps the path a caller sent as it came: gRPC passes escape sequences and line breaks in it.
    path = "/x\x1b]0;pwned\x07\x1b[2J/Y\n12:00:00.000  accounts.log  forged\u202e"
    step = trail.audited(record(12, 5, "access", principal="mallory", action=path, decision="deny",
                                reason="no rule"))
    assert step.text.isascii() and step.text.isprintable(), step.text
    assert step.text == ("access: mallory /x\\x1b]0;pwned\\x07\\x1b[2J/Y\\n12:00:00.000  accounts.log  forged"
                         "\\u202e: deny (no rule)")
