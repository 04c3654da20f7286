"""Recorded spans (bastion/grpc/spans.py): only sampled traces, children of the caller's span, the id handed on."""

import json

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from bastion.grpc.spans import SpanRecorder, jsonl_exporter
from bastion.grpc.trace import trace_context_from

METHOD = "/bastion.accounts.v1.Accounts/GetAccount"
TRACE, CALLER_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


def recorder(root_ratio: float = 0.0) -> tuple[SpanRecorder, InMemorySpanExporter]:
    exported = InMemorySpanExporter()
    return SpanRecorder("accounts", processor=SimpleSpanProcessor(exported), root_ratio=root_ratio), exported


def traceparent(flags: str = "01") -> list[tuple[str, str]]:
    return [("traceparent", f"00-{TRACE}-{CALLER_SPAN}-{flags}")]


def only(exported: InMemorySpanExporter) -> ReadableSpan:
    [span] = exported.get_finished_spans()
    return span


def test_a_call_the_caller_sampled_is_recorded_as_a_child_of_the_callers_span_with_the_id_it_hands_on():
    spans, exported = recorder()
    span, trace = spans.start(METHOD, trace_context_from(traceparent("01")))
    SpanRecorder.end(span, grpc.StatusCode.OK, "corr-1", "spiffe://bastion.local/service/payments")
    recorded = only(exported)
    assert recorded.name == "bastion.accounts.v1.Accounts/GetAccount" and recorded.kind is SpanKind.SERVER
    assert f"{recorded.context.trace_id:032x}" == TRACE == trace.trace_id
    assert recorded.parent is not None and f"{recorded.parent.span_id:016x}" == CALLER_SPAN
    assert f"{recorded.context.span_id:016x}" == trace.span_id, "downstream calls name the recorded span"
    assert trace.child_headers()[0][1] == f"00-{TRACE}-{trace.span_id}-01"
    assert dict(recorded.attributes or {}) == {
        "rpc.system": "grpc", "rpc.service": "bastion.accounts.v1.Accounts", "rpc.method": "GetAccount",
        "rpc.grpc.status_code": 0, "bastion.correlation_id": "corr-1",
        "bastion.peer_service": "spiffe://bastion.local/service/payments"}
    assert recorded.status.status_code is StatusCode.UNSET
    assert recorded.resource.attributes["service.name"] == "accounts"


def test_a_trace_the_caller_did_not_sample_is_not_recorded():
    spans, exported = recorder(root_ratio=1.0)
    before = trace_context_from(traceparent("00"))
    span, trace = spans.start(METHOD, before)
    SpanRecorder.end(span, grpc.StatusCode.OK, "corr-1", None)
    assert span is None and trace == before and not exported.get_finished_spans()


def test_a_new_trace_is_recorded_only_in_the_share_set_for_new_traces():
    never, exported = recorder(root_ratio=0.0)
    for _ in range(50):
        span, _trace = never.start(METHOD, trace_context_from([]))
        assert span is None
    assert not exported.get_finished_spans()

    always, exported = recorder(root_ratio=1.0)
    root = trace_context_from([])
    span, trace = always.start(METHOD, root)
    SpanRecorder.end(span, grpc.StatusCode.OK, "corr-1", None)
    recorded = only(exported)
    assert recorded.parent is None and trace.sampled and trace.parent_id is None
    assert (trace.trace_id, trace.span_id) == (f"{recorded.context.trace_id:032x}", f"{recorded.context.span_id:016x}")

    half, exported = recorder(root_ratio=0.5)
    for _ in range(400):
        span, _trace = half.start(METHOD, trace_context_from([]))
        SpanRecorder.end(span, grpc.StatusCode.OK, "corr-1", None)
    assert 120 < len(exported.get_finished_spans()) < 280


@pytest.mark.parametrize(("code", "error"), [
    (grpc.StatusCode.INTERNAL, True), (grpc.StatusCode.UNAVAILABLE, True), (grpc.StatusCode.UNKNOWN, True),
    (grpc.StatusCode.PERMISSION_DENIED, False), (grpc.StatusCode.UNAUTHENTICATED, False),
    (grpc.StatusCode.INVALID_ARGUMENT, False), (grpc.StatusCode.NOT_FOUND, False),
])
def test_a_server_span_is_an_error_only_for_a_failure_of_the_server(code: grpc.StatusCode, error: bool):
    spans, exported = recorder()
    span, _trace = spans.start(METHOD, trace_context_from(traceparent()))
    SpanRecorder.end(span, code, "corr-1", None)
    recorded = only(exported)
    assert (recorded.attributes or {})["rpc.grpc.status_code"] == code.value[0]
    assert recorded.status.status_code is (StatusCode.ERROR if error else StatusCode.UNSET)


def test_a_span_is_ended_once_whatever_ends_it_later():
    spans, exported = recorder()
    span, _trace = spans.start(METHOD, trace_context_from(traceparent()))
    SpanRecorder.end(span, grpc.StatusCode.NOT_FOUND, "corr-1", None)
    SpanRecorder.end(span, grpc.StatusCode.CANCELLED, "corr-1", None)
    assert (only(exported).attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]


def test_a_callers_long_method_path_is_cut_in_the_span_name():
    spans, exported = recorder()
    span, _trace = spans.start("/" + "x" * 5000, trace_context_from(traceparent()))
    SpanRecorder.end(span, grpc.StatusCode.UNIMPLEMENTED, "corr-1", None)
    assert len(only(exported).name) == 256


def test_the_share_of_new_traces_must_be_a_share():
    for ratio in (-0.1, 1.5):
        with pytest.raises(ValueError, match="between 0 and 1"):
            SpanRecorder("accounts", InMemorySpanExporter(), root_ratio=ratio)


def test_the_file_exporter_writes_one_json_object_per_span(tmp_path):
    path = tmp_path / "logs" / "accounts.spans.jsonl"
    spans = SpanRecorder("accounts", jsonl_exporter(path))
    for number in range(3):
        span, _trace = spans.start(METHOD, trace_context_from(traceparent()))
        SpanRecorder.end(span, grpc.StatusCode.OK, f"corr-{number}", None)
    spans.shutdown()  # flushes the batch
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    recorded = [json.loads(line) for line in lines]
    assert {entry["attributes"]["bastion.correlation_id"] for entry in recorded} == {"corr-0", "corr-1", "corr-2"}
    assert all(entry["context"]["trace_id"] == "0x" + TRACE and entry["parent_id"] == "0x" + CALLER_SPAN
               for entry in recorded)
