"""Recorded spans (bastion/grpc/spans.py): only sampled traces, children of the caller's span, the id handed on,
within the service's span budget, written as rotated JSON lines."""

import asyncio
import contextlib
import json
import logging.handlers
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import grpc
import pytest
import structlog
from confluent_kafka import KafkaError
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from bastion.accounts.v1.events_pb2 import AccountOpened
from bastion.events.consumer import ConsumerSettings, VerifyingConsumer
from bastion.events.envelopes import envelope_for
from bastion.events.outbox import OutboxEventSink, OutboxRelay, RelayResult, traceparent_of
from bastion.events.v1.envelope_pb2 import Envelope
from bastion.events.verify import VerifiedEvent
from bastion.grpc.context import CallContext, current_call
from bastion.grpc.spans import (
    SPANS_NOT_RECORDED,
    SpanRecorder,
    TracedEvent,
    jsonl_exporter,
    recorded_spans,
    written_spans,
)
from bastion.grpc.trace import TraceContext, trace_context_from

METHOD = "/bastion.accounts.v1.Accounts/GetAccount"
TRACE, CALLER_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
SAMPLED = f"00-{TRACE}-{CALLER_SPAN}-01"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def recorder(root_ratio: float = 0.0, per_second: float = 100.0, clock: Clock | None = None
             ) -> tuple[SpanRecorder, InMemorySpanExporter]:
    exported = InMemorySpanExporter()
    return SpanRecorder("accounts", processor=SimpleSpanProcessor(exported), root_ratio=root_ratio,
                        per_second=per_second, clock=clock or Clock()), exported


def traceparent(flags: str = "01") -> list[tuple[str, str]]:
    return [("traceparent", f"00-{TRACE}-{CALLER_SPAN}-{flags}")]


def record(spans: SpanRecorder, trace: TraceContext, code: grpc.StatusCode = grpc.StatusCode.OK,
           method: str = METHOD) -> TraceContext:
    """What the interceptor does for an admitted call: ask, start, end."""
    if not spans.wanted(trace):
        return trace
    span, trace = spans.start(method, trace, time.time_ns())
    SpanRecorder.end(span, code, "corr-1", "payments")
    return trace


def only(exported: InMemorySpanExporter) -> ReadableSpan:
    [span] = exported.get_finished_spans()
    return span


def test_a_call_the_caller_sampled_is_recorded_as_a_child_of_the_callers_span_with_the_id_it_hands_on():
    spans, exported = recorder()
    arrived = time.time_ns() - 5_000_000
    before = trace_context_from(traceparent("01"))
    assert spans.wanted(before)
    span, trace = spans.start(METHOD, before, arrived)
    SpanRecorder.end(span, grpc.StatusCode.OK, "corr-1", "payments")
    recorded = only(exported)
    assert recorded.name == "bastion.accounts.v1.Accounts/GetAccount" and recorded.kind is SpanKind.SERVER
    assert recorded.start_time == arrived, "the span starts when the call arrived, not when it was admitted"
    assert f"{recorded.context.trace_id:032x}" == TRACE == trace.trace_id
    assert recorded.parent is not None and f"{recorded.parent.span_id:016x}" == CALLER_SPAN
    assert f"{recorded.context.span_id:016x}" == trace.span_id != before.span_id, "downstream names the span"
    assert trace.child_headers()[0][1] == f"00-{TRACE}-{trace.span_id}-01"
    assert dict(recorded.attributes or {}) == {
        "rpc.system": "grpc", "rpc.service": "bastion.accounts.v1.Accounts", "rpc.method": "GetAccount",
        "rpc.grpc.status_code": 0, "bastion.correlation_id": "corr-1", "bastion.peer_service": "payments"}
    assert recorded.status.status_code is StatusCode.UNSET
    assert recorded.resource.attributes["service.name"] == "accounts"


def test_a_trace_the_caller_did_not_sample_is_not_recorded():
    spans, exported = recorder(root_ratio=1.0)
    before = trace_context_from(traceparent("00"))
    assert not spans.wanted(before)
    assert record(spans, before) == before and not exported.get_finished_spans()


def test_a_new_trace_is_recorded_only_in_the_share_set_for_new_traces():
    never, exported = recorder(root_ratio=0.0)
    assert not any(never.wanted(trace_context_from([])) for _ in range(50))

    always, exported = recorder(root_ratio=1.0)
    trace = record(always, trace_context_from([]))
    recorded = only(exported)
    assert recorded.parent is None and trace.sampled and trace.parent_id is None
    assert (trace.trace_id, trace.span_id) == (f"{recorded.context.trace_id:032x}", f"{recorded.context.span_id:016x}")

    half, exported = recorder(root_ratio=0.5, per_second=1000)
    assert 120 < sum(half.wanted(trace_context_from([])) for _ in range(400)) < 280


def test_a_service_records_no_more_spans_a_second_than_its_budget_whatever_its_callers_ask():
    clock = Clock()
    spans, exported = recorder(per_second=3, clock=clock)
    before = SPANS_NOT_RECORDED.labels("accounts")._value.get()
    sampled = trace_context_from(traceparent("01"))
    handed_on = [record(spans, sampled) for _ in range(5)]
    assert len(exported.get_finished_spans()) == 3
    assert SPANS_NOT_RECORDED.labels("accounts")._value.get() - before == 2
    assert handed_on[4] == sampled and handed_on[4].sampled, "not recorded here, the flag still passed on"
    clock.now += 0.34  # a third of a second: one more span's worth
    record(spans, sampled)
    record(spans, sampled)
    assert len(exported.get_finished_spans()) == 4
    clock.now += 60  # the budget refills, never beyond a second's worth
    for _ in range(10):
        record(spans, sampled)
    assert len(exported.get_finished_spans()) == 7


def test_with_the_sdk_switched_off_nothing_is_recorded_and_the_trace_is_handed_on_unchanged(monkeypatch):
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    spans, exported = recorder()
    before = trace_context_from(traceparent("01"))
    span, trace = spans.start(METHOD, before, time.time_ns())
    assert span is None and trace == before and not exported.get_finished_spans()


class BrokenTracer:
    """An SDK that fails to start a span (a broken processor or exporter set-up)."""

    def start_span(self, *_args: object, **_kwargs: object) -> None:
        raise RuntimeError("no span today")


def test_a_span_the_sdk_fails_to_start_leaves_the_call_unrecorded_and_logged_never_refused():
    spans, exported = recorder()
    spans._tracer = BrokenTracer()  # type: ignore[assignment]
    before = trace_context_from(traceparent("01"))
    with structlog.testing.capture_logs() as logs:
        span, trace = spans.start(METHOD, before, time.time_ns())
        client, sent = spans.calling("/bastion.accounts.v1.Accounts/GetAccount", "accounts", None, before, "corr-1")
    assert (span, trace) == (None, before) and (client, sent) == (None, before)
    assert [line["operation"] for line in logs if line["event"] == "span_not_recorded"] == ["serve", "call"]
    assert not exported.get_finished_spans()


@pytest.mark.parametrize(("code", "error"), [
    (grpc.StatusCode.INTERNAL, True), (grpc.StatusCode.UNAVAILABLE, True), (grpc.StatusCode.UNKNOWN, True),
    (grpc.StatusCode.PERMISSION_DENIED, False), (grpc.StatusCode.NOT_FOUND, False),
    (grpc.StatusCode.INVALID_ARGUMENT, False), (grpc.StatusCode.CANCELLED, False),
    (grpc.StatusCode.DEADLINE_EXCEEDED, True), (grpc.StatusCode.UNIMPLEMENTED, True), (grpc.StatusCode.DATA_LOSS, True),
    (grpc.StatusCode.UNAUTHENTICATED, False), (grpc.StatusCode.RESOURCE_EXHAUSTED, False),
    (grpc.StatusCode.FAILED_PRECONDITION, False),
])
def test_a_server_span_is_an_error_only_for_a_failure_of_the_server(code: grpc.StatusCode, error: bool):
    spans, exported = recorder()
    record(spans, trace_context_from(traceparent()), code)
    recorded = only(exported)
    assert (recorded.attributes or {})["rpc.grpc.status_code"] == code.value[0]
    assert recorded.status.status_code is (StatusCode.ERROR if error else StatusCode.UNSET)


def test_the_share_of_new_traces_and_the_budget_must_make_sense():
    for ratio in (-0.1, 1.5):
        with pytest.raises(ValueError, match="between 0 and 1"):
            SpanRecorder("accounts", InMemorySpanExporter(), root_ratio=ratio)
    with pytest.raises(ValueError, match="more than 0 spans a second"):
        SpanRecorder("accounts", InMemorySpanExporter(), per_second=0)


def test_the_file_exporter_writes_one_json_object_per_span(tmp_path):
    path = tmp_path / "logs" / "accounts.spans.jsonl"
    spans = SpanRecorder("accounts", jsonl_exporter(path))
    for number in range(3):
        trace = trace_context_from(traceparent())
        span, _trace = spans.start(METHOD, trace, time.time_ns())
        SpanRecorder.end(span, grpc.StatusCode.OK, f"corr-{number}", None)
    spans.shutdown()  # flushes the batch
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    recorded = [json.loads(line) for line in lines]
    assert {entry["attributes"]["bastion.correlation_id"] for entry in recorded} == {"corr-0", "corr-1", "corr-2"}
    assert all(entry["context"]["trace_id"] == "0x" + TRACE and entry["parent_id"] == "0x" + CALLER_SPAN
               for entry in recorded)

    with path.open("a") as file:
        file.write('{"context": {"trace_id": "0x' + TRACE + '"}, "name": "cut sh')  # a line still being written
    assert len(recorded_spans(path.parent, ["accounts", "payments"], TRACE)) == 3
    assert recorded_spans(path.parent, ["accounts"], "0" * 31 + "1") == []


def test_the_span_file_is_rotated_and_only_so_many_older_files_are_kept(tmp_path):
    path = tmp_path / "accounts.spans.jsonl"
    spans = SpanRecorder("accounts", jsonl_exporter(path, max_bytes=3000, kept=2), per_second=1000)
    for _ in range(20):
        span, _trace = spans.start(METHOD, trace_context_from(traceparent()), time.time_ns())
        SpanRecorder.end(span, grpc.StatusCode.OK, "corr-1", None)
    spans.shutdown()
    files = sorted(file.name for file in tmp_path.iterdir())
    assert files == ["accounts.spans.jsonl", "accounts.spans.jsonl.1", "accounts.spans.jsonl.2"]
    for file in tmp_path.iterdir():
        assert file.stat().st_size <= 3000
        assert all(json.loads(line)["name"] for line in file.read_text().splitlines())
    # Readers see the rotated files too, oldest first, so a trace is whole across a rotation.
    read = [span["start_time"] for span in recorded_spans(tmp_path, ["accounts"], TRACE)]
    lines = sum(len(file.read_text().splitlines()) for file in tmp_path.iterdir())
    assert len(read) == lines > len((tmp_path / "accounts.spans.jsonl").read_text().splitlines())
    assert read == sorted(read)
    (tmp_path / "accounts.spans.jsonl.backup").write_text((tmp_path / "accounts.spans.jsonl.1").read_text())
    assert len(recorded_spans(tmp_path, ["accounts"], TRACE)) == lines, "only the rotation's numbered files"
    # a rotation while the files are read: a span seen in two files is read once
    with (tmp_path / "accounts.spans.jsonl").open("a") as current:
        current.write((tmp_path / "accounts.spans.jsonl.2").read_text())
    assert len(recorded_spans(tmp_path, ["accounts"], TRACE)) == lines


# Events: the span of the call that caused an event is named in it (signed), and the consumer's span is its child.

def test_an_event_carries_the_trace_context_of_the_call_that_caused_it_only_when_that_span_was_recorded():
    spans, _exported = recorder()
    span, trace = spans.start(METHOD, trace_context_from(traceparent()), time.time_ns())
    recorded = CallContext("corr-1", "payments", None, METHOD, trace=trace, span=span)
    assert traceparent_of(recorded) == f"00-{TRACE}-{trace.span_id}-01"
    unrecorded = CallContext("corr-1", "payments", None, METHOD, trace=trace_context_from(traceparent()))
    assert traceparent_of(unrecorded) == "" and traceparent_of(None) == ""


def test_processing_a_sampled_event_is_a_consumer_span_child_of_the_span_that_caused_it():
    spans, exported = recorder()
    with spans.processing("accounts.events.v1", "bastion.accounts.v1.TransferApplied", "ev-1", "corr-1",
                          f"00-{TRACE}-{CALLER_SPAN}-01"):
        pass
    recorded = only(exported)
    assert recorded.name == "process accounts.events.v1" and recorded.kind is SpanKind.CONSUMER
    assert f"{recorded.context.trace_id:032x}" == TRACE
    assert recorded.parent is not None and f"{recorded.parent.span_id:016x}" == CALLER_SPAN
    assert dict(recorded.attributes or {}) == {
        "messaging.system": "kafka", "messaging.operation.type": "process",
        "messaging.destination.name": "accounts.events.v1", "bastion.event_type": "bastion.accounts.v1.TransferApplied",
        "bastion.event_id": "ev-1", "bastion.correlation_id": "corr-1"}
    assert recorded.status.status_code is StatusCode.UNSET


@pytest.mark.parametrize("header", ["", f"00-{TRACE}-{CALLER_SPAN}-00", f"00-{TRACE.upper()}-{CALLER_SPAN}-01",
                                    "not a traceparent"])
def test_an_event_without_a_sampled_well_formed_trace_context_is_processed_without_a_span(header: str):
    spans, exported = recorder()
    ran = []
    with spans.processing("accounts.events.v1", "t", "ev-1", "corr-1", header):
        ran.append(True)
    assert ran == [True] and not exported.get_finished_spans()


def test_a_handler_that_fails_ends_its_span_as_an_error_and_the_failure_goes_on():
    spans, exported = recorder()
    with pytest.raises(RuntimeError), spans.processing("accounts.events.v1", "t", "ev-1", "corr-1",
                                                        f"00-{TRACE}-{CALLER_SPAN}-01"):
        raise RuntimeError("poison")
    assert only(exported).status.status_code is StatusCode.ERROR


def test_event_spans_share_the_services_budget():
    spans, exported = recorder(per_second=2)
    for _ in range(4):
        with spans.processing("accounts.events.v1", "t", "ev-1", "corr-1", f"00-{TRACE}-{CALLER_SPAN}-01"):
            pass
    assert len(exported.get_finished_spans()) == 2


def traced_event(header: str = f"00-{TRACE}-{CALLER_SPAN}-01", number: int = 1) -> TracedEvent:
    return TracedEvent("payments.events.v1", "bastion.payments.v1.TransferCompleted", f"ev-{number}", "corr-1",
                       header)


def test_relaying_sampled_events_leaves_a_producer_span_for_each_child_of_the_span_that_caused_it():
    spans, exported = recorder()
    events = [traced_event(number=1), traced_event(f"00-{TRACE}-{CALLER_SPAN}-00", 2), traced_event("", 3),
              traced_event("00-junk-01", 4), traced_event(number=5)]
    recorded = spans.events_handled("send", events, 1_000_000_000, 1_250_000_000, None,
                                    {"messaging.destination.partition.id": "2", "messaging.batch.message_count": 5})
    assert recorded == 2
    sent = exported.get_finished_spans()
    assert [dict(span.attributes or {})["bastion.event_id"] for span in sent] == ["ev-1", "ev-5"]
    for span, event_id in zip(sent, ["ev-1", "ev-5"], strict=True):
        assert span.name == "send payments.events.v1" and span.kind is SpanKind.PRODUCER
        assert (span.start_time, span.end_time) == (1_000_000_000, 1_250_000_000)
        assert f"{span.context.trace_id:032x}" == TRACE and f"{span.parent.span_id:016x}" == CALLER_SPAN  # type: ignore[union-attr]
        assert dict(span.attributes or {}) == {
            "messaging.system": "kafka", "messaging.operation.type": "send",
            "messaging.destination.name": "payments.events.v1",
            "bastion.event_type": "bastion.payments.v1.TransferCompleted", "bastion.event_id": event_id,
            "bastion.correlation_id": "corr-1", "messaging.destination.partition.id": "2",
            "messaging.batch.message_count": 5}
        assert span.status.status_code is StatusCode.UNSET


def test_an_event_not_delivered_leaves_an_error_span_and_a_consumers_span_is_a_consumer_span():
    spans, exported = recorder()
    spans.events_handled("send", [traced_event()], 1, 2, "Local: Message timed out")
    spans.events_handled("process", [traced_event()], 3, 4)
    failed, processed = exported.get_finished_spans()
    assert failed.status.status_code is StatusCode.ERROR and failed.status.description == "Local: Message timed out"
    assert processed.kind is SpanKind.CONSUMER and processed.name == "process payments.events.v1"
    assert processed.status.status_code is StatusCode.UNSET


def test_spans_of_relayed_and_recorded_events_share_the_services_budget_and_the_rest_are_counted():
    spans, exported = recorder(per_second=3)
    before = SPANS_NOT_RECORDED.labels("accounts")._value.get()
    assert spans.events_handled("send", [traced_event(number=n) for n in range(2)], 1, 2) == 2
    assert spans.events_handled("process", [traced_event(number=n) for n in range(2)], 1, 2) == 1
    assert len(exported.get_finished_spans()) == 3
    assert SPANS_NOT_RECORDED.labels("accounts")._value.get() - before == 1


def test_a_traced_event_is_named_by_its_envelope():
    envelope = Envelope(event_id="ev-9", event_type="t", topic="accounts.events.v1", correlation_id="c",
                        traceparent=f"00-{TRACE}-{CALLER_SPAN}-01")
    assert TracedEvent.of(envelope) == TracedEvent("accounts.events.v1", "t", "ev-9", "c",
                                                   f"00-{TRACE}-{CALLER_SPAN}-01")


# The outbox relay: a PRODUCER span per traced event it published, from its batch's start to the broker's answer.

class Rows:
    """A connection of the fake engine: the outbox rows to select, and the ids the relay marks sent."""

    def __init__(self, rows: list[SimpleNamespace]) -> None:
        self.rows, self.marked = rows, []

    def execute(self, statement: object) -> SimpleNamespace:
        if str(statement).startswith("UPDATE"):
            self.marked.extend(statement.compile().params["id_1"])  # type: ignore[attr-defined]
        return SimpleNamespace(all=lambda: self.rows)


class Engine:
    def __init__(self, conn: Rows) -> None:
        self.conn = conn

    @contextlib.contextmanager
    def begin(self) -> Iterator[Rows]:
        yield self.conn


class Broker:
    """A producer whose answer depends on the topic: acknowledged, refused by the broker, or refused at once."""

    def __init__(self) -> None:
        self.reports: list[tuple[object, KafkaError | None]] = []

    def produce(self, topic: str, value: bytes, partition: int, headers: object, on_delivery: object) -> None:
        if topic == "refused.at.once":
            raise BufferError("Local: Queue full")
        failed = KafkaError(KafkaError._MSG_TIMED_OUT, "Local: Message timed out") if topic == "timed.out" else None
        if topic != "never.answered":  # flush gave up before the broker answered
            self.reports.append((on_delivery, failed))

    def poll(self, _timeout: float) -> int:
        return 0

    def flush(self, _timeout: float) -> int:
        for report, error in self.reports:
            report(error, None)  # type: ignore[operator]
        self.reports = []
        return 0


def test_the_relay_leaves_a_producer_span_for_each_traced_event_it_published_and_an_error_for_one_not_delivered(
        ring):
    spans, exported = recorder()
    key = ring.signing_key("accounts")
    rows = []
    for number, (topic, header) in enumerate([
            ("delivered", SAMPLED), ("delivered", ""), ("delivered", f"00-{TRACE}-{CALLER_SPAN}-00"),
            ("timed.out", SAMPLED), ("never.answered", SAMPLED), ("refused.at.once", SAMPLED)]):
        envelope = envelope_for(key, topic, AccountOpened(account_id=f"a{number}"), f"a{number}", 1, "corr-1",
                                event_id=f"ev-{number}", traceparent=header)
        rows.append(SimpleNamespace(id=number, topic=topic, partition_key=f"a{number}",
                                    envelope=envelope.SerializeToString()))
    conn = Rows(rows)
    relay = OutboxRelay.__new__(OutboxRelay)  # no Kafka, no database: the fakes above
    relay.engine, relay.key, relay.batch_size, relay.flush_timeout = Engine(conn), key, 500, 1.0  # type: ignore[assignment]
    relay.producer, relay.spans = Broker(), spans  # type: ignore[assignment]
    relay._partition_counts = {"delivered": 1, "timed.out": 1, "never.answered": 1, "refused.at.once": 1}
    before = time.time_ns()
    assert relay.run_once() == RelayResult(published=3, failed=3)
    assert sorted(conn.marked) == [0, 1, 2]
    sent, failed, unanswered = exported.get_finished_spans()  # none for the untraced, the unsampled, the one never
    # handed over
    assert [dict(span.attributes or {})["bastion.event_id"] for span in (sent, failed, unanswered)] == \
        ["ev-0", "ev-3", "ev-4"]
    assert sent.kind is SpanKind.PRODUCER and sent.name == "send delivered"
    assert sent.status.status_code is StatusCode.UNSET
    assert (failed.status.status_code, failed.status.description) == (StatusCode.ERROR, "Local: Message timed out")
    assert (unanswered.status.status_code, unanswered.status.description) == \
        (StatusCode.ERROR, "not acknowledged in time")
    assert dict(sent.attributes or {})["messaging.batch.message_count"] == 3
    assert f"{sent.parent.span_id:016x}" == CALLER_SPAN  # type: ignore[union-attr]
    assert before <= sent.start_time <= sent.end_time <= time.time_ns()  # type: ignore[operator]


class BrokenProcessor(SimpleSpanProcessor):
    def on_end(self, span: ReadableSpan) -> None:
        raise RuntimeError("the exporter's queue broke")


def test_a_span_that_cannot_be_recorded_never_stops_the_call_or_the_events_it_follows():
    spans = SpanRecorder("accounts", processor=BrokenProcessor(InMemorySpanExporter()))
    with structlog.testing.capture_logs() as logs:
        assert spans.events_handled("send", [traced_event()], 1, 2) == 0
        handled = []
        with spans.processing("accounts.events.v1", "t", "ev-1", "corr-1", SAMPLED):
            handled.append(True)
        assert handled == [True]
        span, _trace = spans.start(METHOD, trace_context_from(traceparent()), time.time_ns())
        SpanRecorder.end(span, grpc.StatusCode.OK, "corr-1", None)
    assert [entry["event"] for entry in logs] == ["span_not_recorded"] * 3


class CapturingOutbox:
    producer = "accounts"

    def __init__(self) -> None:
        self.appended: list[dict[str, object]] = []

    def append(self, conn: object, topic: str, payload: object, aggregate_id: str, correlation_id: str,
               traceparent: str = "") -> None:
        self.appended.append({"correlation_id": correlation_id, "traceparent": traceparent})


def test_an_event_emitted_during_a_recorded_call_names_its_span_and_one_emitted_otherwise_nothing():
    spans, _exported = recorder()
    span, trace = spans.start(METHOD, trace_context_from(traceparent()), time.time_ns())
    outbox = CapturingOutbox()
    sink = OutboxEventSink(None, outbox, "accounts.events.v1")  # type: ignore[arg-type]
    token = current_call.set(CallContext("corr-1", "payments", None, METHOD, trace=trace, span=span))
    try:
        sink.emit(AccountOpened(account_id="a1"), "a1")
    finally:
        current_call.reset(token)
    sink.emit(AccountOpened(account_id="a2"), "a2")  # no call: a background job's event
    assert outbox.appended == [{"correlation_id": "corr-1", "traceparent": f"00-{TRACE}-{trace.span_id}-01"},
                               {"correlation_id": "accounts:a2", "traceparent": ""}]


def test_the_verifying_consumer_records_the_processing_of_a_traced_event_around_its_handler(monkeypatch):
    spans, exported = recorder()
    monkeypatch.setattr("bastion.events.consumer.inbox.record", lambda conn, event: None)
    handled = []
    consumer = VerifyingConsumer.__new__(VerifyingConsumer)  # no Kafka: only the apply step runs
    consumer.settings = ConsumerSettings("notifications", "notifications", ["accounts.events.v1"])
    consumer.handler = lambda conn, event: handled.append(len(exported.get_finished_spans()))
    consumer.spans = spans
    envelope = Envelope(event_id="ev-1", event_type="bastion.accounts.v1.AccountOpened", topic="accounts.events.v1",
                        correlation_id="corr-1", traceparent=f"00-{TRACE}-{CALLER_SPAN}-01")
    consumer._apply(None, VerifiedEvent(envelope, AccountOpened()))  # type: ignore[arg-type]
    envelope.traceparent = ""
    consumer._apply(None, VerifiedEvent(envelope, AccountOpened()))  # type: ignore[arg-type]
    assert handled == [0, 1], "the span ends after the handler"
    recorded = only(exported)
    assert recorded.kind is SpanKind.CONSUMER and f"{recorded.parent.span_id:016x}" == CALLER_SPAN  # type: ignore[union-attr]


# The recorder's set-up, its edges and its failures (a mutation review's gaps).

def test_a_recorder_takes_an_exporter_or_a_processor_but_not_both_and_not_neither():
    with pytest.raises(ValueError, match="not both"):
        SpanRecorder("accounts", InMemorySpanExporter(), processor=SimpleSpanProcessor(InMemorySpanExporter()))
    with pytest.raises(ValueError, match="not both"):
        SpanRecorder("accounts")


def test_the_sdks_own_sampler_settings_never_turn_a_span_the_kit_decided_to_record_into_nothing(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    spans, exported = recorder()
    before = trace_context_from(traceparent())
    span, trace = spans.start(METHOD, before, time.time_ns())
    SpanRecorder.end(span, grpc.StatusCode.OK, "corr-1", None)
    recorded = only(exported)
    assert trace.span_id == f"{recorded.context.span_id:016x}" != before.span_id
    assert recorded.parent is not None and recorded.parent.is_remote, "a child of the caller's span, in another process"


def test_a_finished_span_is_written_within_about_a_second_without_waiting_for_shutdown(tmp_path):
    path = tmp_path / "accounts.spans.jsonl"
    spans = SpanRecorder("accounts", jsonl_exporter(path))
    try:
        span, _trace = spans.start(METHOD, trace_context_from(traceparent()), time.time_ns())
        SpanRecorder.end(span, grpc.StatusCode.OK, "corr-1", None)
        deadline = time.monotonic() + 3  # the SDK's default would wait 5 s
        while not (path.exists() and path.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(path.read_text().splitlines()) == 1
    finally:
        spans.shutdown()


def test_long_names_ids_and_failures_are_cut_to_the_span_limit():
    long = "x" * 300
    spans, exported = recorder()
    served, trace = spans.start(f"/{long}/{long}", trace_context_from(traceparent()), time.time_ns())
    call, _sent = spans.calling(f"/{long}/{long}", long, served, trace, long)
    SpanRecorder.call_ended(call, grpc.StatusCode.UNAVAILABLE, 1, long)
    SpanRecorder.end(served, grpc.StatusCode.OK, "corr-1", None)
    event = TracedEvent(long, long, long, long, SAMPLED)
    spans.events_handled("send", [event], 1, 2, long)
    for span in exported.get_finished_spans():
        assert all(len(value) <= 256 for value in (span.attributes or {}).values() if isinstance(value, str)), span
        assert len(span.status.description or "") <= 256
    client, server, sent = exported.get_finished_spans()
    assert (client.name, server.name) == (f"{long}/{long}"[:256],) * 2 and sent.name == f"send {'x' * 256}"
    assert (client.status.description, sent.status.description) == ("x" * 256,) * 2


def test_a_call_that_failed_without_a_message_is_an_error_named_by_its_code():
    spans, exported = recorder()
    served, trace = spans.start(METHOD, trace_context_from(traceparent()), time.time_ns())
    call, _sent = spans.calling(METHOD, "accounts", served, trace, "corr-1")
    SpanRecorder.call_ended(call, grpc.StatusCode.UNAVAILABLE, 0)
    failed = only(exported)
    assert (failed.status.status_code, failed.status.description) == (StatusCode.ERROR, "UNAVAILABLE")


def test_with_the_sdk_switched_off_no_client_or_event_span_is_recorded_or_counted(monkeypatch):
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    spans, exported = recorder()
    before = trace_context_from(traceparent())
    assert spans.calling(METHOD, "accounts", None, before, "corr-1") == (None, before)
    assert spans.events_handled("send", [traced_event(number=1), traced_event(number=2)], 1, 2) == 0
    with spans.processing("accounts.events.v1", "t", "ev-1", "corr-1", SAMPLED):
        pass
    assert not exported.get_finished_spans()


def test_ending_a_span_twice_changes_nothing_and_warns_of_nothing(caplog):
    spans, exported = recorder()
    served, trace = spans.start(METHOD, trace_context_from(traceparent()), time.time_ns())
    call, _sent = spans.calling(METHOD, "accounts", served, trace, "corr-1")
    SpanRecorder.call_ended(call, grpc.StatusCode.OK, 1)
    SpanRecorder.end(served, grpc.StatusCode.OK, "corr-1", "payments")
    with caplog.at_level("WARNING"):
        SpanRecorder.call_ended(call, grpc.StatusCode.INTERNAL, 2, "again")
        SpanRecorder.end(served, grpc.StatusCode.INTERNAL, "corr-2", "web")
    assert caplog.records == []
    client, server = exported.get_finished_spans()
    assert client.status.status_code is server.status.status_code is StatusCode.UNSET


@pytest.mark.parametrize("peer", [None, ""])
def test_a_call_without_a_peer_identity_has_no_peer_attribute(peer: str | None):
    spans, exported = recorder()
    span, _trace = spans.start(METHOD, trace_context_from(traceparent()), time.time_ns())
    SpanRecorder.end(span, grpc.StatusCode.OK, "corr-1", peer)
    assert "bastion.peer_service" not in (only(exported).attributes or {})


def test_a_handler_cancelled_or_interrupted_ends_its_span_as_an_error():
    spans, exported = recorder()
    with pytest.raises(asyncio.CancelledError), spans.processing("accounts.events.v1", "t", "ev-1", "corr-1",
                                                                 SAMPLED):
        raise asyncio.CancelledError
    cancelled = only(exported)
    assert (cancelled.status.status_code, cancelled.status.description) == (StatusCode.ERROR, "CancelledError")


def test_an_event_that_failed_with_an_empty_message_is_still_an_error():
    spans, exported = recorder()
    spans.events_handled("send", [traced_event()], 1, 2, "")
    assert only(exported).status.status_code is StatusCode.ERROR


def test_an_event_span_the_sdk_fails_to_start_is_logged_and_the_event_handled_all_the_same():
    spans, _exported = recorder()
    spans._tracer = BrokenTracer()  # type: ignore[assignment]
    handled = []
    with structlog.testing.capture_logs() as logs:
        assert spans.events_handled("send", [traced_event()], 1, 2) == 0
        with spans.processing("accounts.events.v1", "t", "ev-1", "corr-1", SAMPLED):
            handled.append(True)
    assert handled == [True]
    assert [line["operation"] for line in logs if line["event"] == "span_not_recorded"] == ["send", "process"]


class PausingInstant(float):
    """A reading of a clock whose arithmetic takes a while: two threads spending at once overlap in `_spend`."""

    def __sub__(self, other: float) -> float:
        time.sleep(0.05)
        return float(self) - float(other)


def test_two_threads_spending_at_once_never_spend_more_than_the_budget():
    spans, exported = recorder(per_second=1, clock=lambda: PausingInstant(1000.0))  # type: ignore[arg-type]
    start = threading.Barrier(2)

    def spend() -> None:
        start.wait()
        record(spans, trace_context_from(traceparent()))

    threads = [threading.Thread(target=spend) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert len(exported.get_finished_spans()) == 1


class Handlers:
    """Stands in for logging.handlers.RotatingFileHandler: keeps how it was asked to rotate."""

    def __init__(self) -> None:
        self.made: list[tuple[int, int]] = []

    def __call__(self, path: object, maxBytes: int, backupCount: int, encoding: str) -> "Handlers":
        self.made.append((maxBytes, backupCount))
        return self

    def setFormatter(self, _formatter: object) -> None:
        pass


def test_a_span_file_is_rotated_at_64_mib_with_three_older_files_kept_by_default(tmp_path, monkeypatch):
    handlers = Handlers()
    monkeypatch.setattr(logging.handlers, "RotatingFileHandler", handlers)
    jsonl_exporter(tmp_path / "accounts.spans.jsonl")
    assert handlers.made == [(64 * 1024 * 1024, 3)]


def span_of(trace: str, span_id: str, started: str, name: str = "GetAccount") -> str:
    return json.dumps({"name": name, "context": {"trace_id": f"0x{trace}", "span_id": f"0x{span_id}"},
                       "start_time": started})


def test_rotated_span_files_are_read_oldest_first_by_their_number_not_their_name(tmp_path):
    for number, started in ((10, "2030-01-01T00:00:01Z"), (2, "2030-01-01T00:00:02Z"), (1, "2030-01-01T00:00:03Z")):
        (tmp_path / f"accounts.spans.jsonl.{number}").write_text(span_of(TRACE, f"{number:016x}", started) + "\n")
    (tmp_path / "accounts.spans.jsonl").write_text(span_of(TRACE, "f" * 16, "2030-01-01T00:00:04Z") + "\n")
    (tmp_path / "accounts.spans.jsonl.1~").write_text(span_of(TRACE, "e" * 16, "2030-01-01T00:00:00Z") + "\n")
    read = [span["start_time"] for span in recorded_spans(tmp_path, ["accounts"], TRACE)]
    assert read == [f"2030-01-01T00:00:0{second}Z" for second in (1, 2, 3, 4)], "an editor's backup is not a rotation"


def test_a_service_without_a_span_file_leaves_the_others_to_be_read(tmp_path):
    (tmp_path / "payments.spans.jsonl").write_text(span_of(TRACE, "a" * 16, "2030-01-01T00:00:01Z") + "\n")
    assert [service for service, _span in written_spans(tmp_path, ["accounts", "payments"], TRACE)] == ["payments"]


def test_only_spans_of_the_trace_and_lines_that_are_spans_are_read(tmp_path):
    other = "0" * 31 + "1"
    (tmp_path / "accounts.spans.jsonl").write_text("\n".join([
        span_of(TRACE, "a" * 16, "2030-01-01T00:00:01Z"),
        span_of(other, "b" * 16, "2030-01-01T00:00:02Z", name=f"names {TRACE}"),  # another trace that names it
        json.dumps({"context": {"span_id": "0x" + "c" * 16}, "name": TRACE}),  # no trace id at all
        json.dumps({"context": TRACE, "name": "a context that is not an object"}),
        json.dumps([TRACE]),
    ]) + "\n")
    assert [span["context"]["span_id"] for span in recorded_spans(tmp_path, ["accounts"], TRACE)] == ["0x" + "a" * 16]
    assert [span["context"]["span_id"] for _service, span in written_spans(tmp_path, ["accounts"], "names")] == \
        ["0x" + "b" * 16], "only the lines containing the text"


def test_spans_the_file_could_not_take_are_counted_not_lost_in_silence(tmp_path):
    # A rotation that fails (here the name of the newest older file is taken by a folder; a full disk alike) lost
    # the spans with the file's exporter saying all was well: nothing counted them.
    from prometheus_client import REGISTRY

    def not_exported() -> float:
        return REGISTRY.get_sample_value("bastion_spans_not_exported_total",
                                         {"service": "ledger", "exporter": "default"}) or 0.0

    path = tmp_path / "ledger.spans.jsonl"
    (tmp_path / "ledger.spans.jsonl.1").mkdir()
    before = not_exported()
    spans = SpanRecorder("ledger", jsonl_exporter(path, max_bytes=100, kept=2))
    for number in range(3):
        span, _trace = spans.start(METHOD, trace_context_from(traceparent()), time.time_ns())
        SpanRecorder.end(span, grpc.StatusCode.OK, f"corr-{number}", None)
    spans.shutdown()
    written = len(path.read_text().splitlines())
    assert not_exported() - before >= 3 - written > 0, "every span not written is counted"
