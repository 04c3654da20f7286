"""`bastion trail` and the span files: a request's server, client and consumer spans, each one line at its start;
spans of other requests and lines that are not spans passed over."""

import time
from pathlib import Path
from types import SimpleNamespace

import grpc

from bastion.grpc.spans import SpanRecorder, jsonl_exporter
from bastion.grpc.trace import trace_context_from
from bastion.trail import spanned

TRACE, CALLER = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


def written(log_dir: Path, service: str, correlation_id: str) -> str:
    """A server span and the processing of the event it caused, as SERVICE writes them; the server span's id."""
    spans = SpanRecorder(service, jsonl_exporter(log_dir / f"{service}.spans.jsonl"))
    span, trace = spans.start("/bastion.accounts.v1.Accounts/ApplyTransfer",
                              trace_context_from([("traceparent", f"00-{TRACE}-{CALLER}-01")]), time.time_ns())
    SpanRecorder.end(span, grpc.StatusCode.OK, correlation_id, "payments")
    with spans.processing("accounts.events.v1", "bastion.accounts.v1.TransferApplied", "ev-1", correlation_id,
                          trace.child_headers()[0][1]):
        pass
    spans.shutdown()
    return trace.span_id


def test_a_requests_spans_are_in_its_trail_and_nothing_else(tmp_path: Path) -> None:
    server_span = written(tmp_path, "accounts", "corr-1")
    written(tmp_path, "notifications", "corr-2")  # another request's
    with (tmp_path / "accounts.spans.jsonl").open("a") as file:
        file.write('{"context": {}, "attributes": ["corr-1"]}\nnot json at all corr-1\n')
    ctx = SimpleNamespace(layout=SimpleNamespace(log_dir=tmp_path), service_names=["accounts", "notifications"])
    steps = spanned(ctx, "corr-1")  # type: ignore[arg-type]
    assert [step.source for step in steps] == ["accounts.spans", "accounts.spans"]
    served, processed = sorted(steps)
    assert served.text.startswith("span bastion.accounts.v1.Accounts/ApplyTransfer ")
    assert f", code 0, trace {TRACE} span {server_span} parent {CALLER}" in served.text
    assert processed.text.startswith("span process accounts.events.v1 ")
    assert f", bastion.accounts.v1.TransferApplied UNSET, trace {TRACE} span " in processed.text
    assert processed.text.endswith(f" parent {server_span}") and served.at <= processed.at


def test_a_call_made_downstream_is_in_the_trail_as_a_call_with_its_attempts(tmp_path: Path) -> None:
    spans = SpanRecorder("payments", jsonl_exporter(tmp_path / "payments.spans.jsonl"))
    served, trace = spans.start("/bastion.payments.v1.Payments/Transfer",
                                trace_context_from([("traceparent", f"00-{TRACE}-{CALLER}-01")]), time.time_ns())
    call, sent = spans.calling("/bastion.accounts.v1.Accounts/ApplyTransfer", "accounts", served, trace, "corr-1")
    SpanRecorder.call_ended(call, grpc.StatusCode.UNAVAILABLE, 3, "accounts did not answer within 2.0s")
    SpanRecorder.end(served, grpc.StatusCode.UNAVAILABLE, "corr-1", "web")
    spans.shutdown()
    ctx = SimpleNamespace(layout=SimpleNamespace(log_dir=tmp_path), service_names=["payments"])
    transfer, applied = sorted(spanned(ctx, "corr-1"))  # type: ignore[arg-type]
    assert transfer.text.startswith("span bastion.payments.v1.Payments/Transfer ")
    assert applied.text.startswith("call to accounts bastion.accounts.v1.Accounts/ApplyTransfer ")
    assert f", code 14, 3 attempt(s), trace {TRACE} span {sent.span_id} parent {trace.span_id}" in applied.text
