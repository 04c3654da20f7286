"""Recorded spans of the calls a service serves, with OpenTelemetry's SDK, for the traces that are sampled.

The kit carries W3C trace context on every call (bastion/grpc/trace.py). A span is recorded only for a call whose
trace is sampled: its caller's `traceparent` says so (flag 01), or the call starts a trace and falls in the share
of new traces set by BASTION_TRACE_SAMPLE_RATIO (0 by default). Other calls cost well under a microsecond.

A caller's flag is a request, not an order (the recommendation warns that obeying it blindly lets any caller make
a service record, and write, as much as it likes): only an admitted call is recorded, one that passed the token,
the policy and the caller's rate limit, its span starting when the call arrived; and a service records at most
BASTION_TRACE_SPANS_PER_SECOND spans (100 by default; the sampled calls beyond it are counted, not recorded, and
still pass the flag on). A recorded span is a SERVER span named by the method, a child of the caller's span, with
the RPC attributes of OpenTelemetry's semantic conventions, the gRPC status, the correlation id and the caller's
service identity. Its id is the parent of the handler's downstream calls (of their CLIENT spans, when the kit's
client records them), so the spans one request leaves in several services form one tree.

Events carry the trace context of the recorded call that caused them (signed, envelope field 16), and the spans of
their way join the call's trace as its children: a PRODUCER span `send TOPIC` from the producer's outbox relay (from
its batch's start to the broker's acknowledgement; the gap after the call's span is the time the event waited in the
outbox), and a CONSUMER span `process TOPIC` from each consumer that takes it in (notifications' handlers, the audit
service's append to its log), within the same budget. The calls a recorded call makes to other services are
CLIENT spans of the caller (bastion/grpc/client.py: retries and an open breaker included), whose children are the
downstream's SERVER spans.

The SDK batches finished spans to an exporter on a thread of its own: the services of the dev stack write one
JSON object per line to `logs/SERVICE.spans.jsonl` in the state folder, rotated at 64 MiB with three older files
kept (`jsonl_exporter`), and, when BASTION_TRACE_OTLP_ENDPOINT names a collector, send them to its OTLP/gRPC
receiver as well (`bastion/grpc/otlp.py`: mutual TLS only, never plaintext); any other `SpanExporter` plugs in the same
way. A batch an exporter could not deliver is logged by the SDK and counted (`bastion_spans_not_exported_total`).
"""

import contextlib
import datetime as dt
import io
import json
import logging.handlers
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from random import Random
from typing import IO, Any, Protocol, cast

import grpc
import structlog
from opentelemetry import trace as otel
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from prometheus_client import Counter

from bastion.grpc.trace import TraceContext, parse_traceparent

# A server span's status is an error only for these codes (OpenTelemetry's semantic conventions for gRPC): the
# others are answers to the caller's request, not failures of the server.
SERVER_ERRORS = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
                           grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE,
                           grpc.StatusCode.DATA_LOSS})
MAX_SPAN_NAME = 256
EXPORT_EVERY_MS = 1000  # how long a finished span may wait in the batch before it is written
SPAN_FILE_BYTES = 64 * 1024 * 1024  # a span file is rotated at this size ...
SPAN_FILES_KEPT = 3  # ... keeping this many older ones
log = structlog.get_logger(__name__)
ROTATED = re.compile(r"\.[0-9]{1,3}")  # the suffix of a rotated span file
SPANS_NOT_EXPORTED = Counter("bastion_spans_not_exported_total",
                             "Recorded spans an exporter could not deliver (a collector unreachable or refusing)",
                             ["service", "exporter"])
SPANS_NOT_RECORDED = Counter("bastion_spans_not_recorded_total",
                             "Sampled calls and events whose span was not recorded: the service's span budget was "
                             "spent",
                             ["service"])


class _Envelope(Protocol):
    topic: str
    event_type: str
    event_id: str
    correlation_id: str
    traceparent: str


@dataclass(frozen=True)
class TracedEvent:
    """An event as its spans name it, with the trace context it carries (signed, in its envelope): the span of
    the call that caused it, or "" when that call was not recorded."""

    topic: str
    event_type: str
    event_id: str
    correlation_id: str
    traceparent: str

    @classmethod
    def of(cls, envelope: _Envelope) -> "TracedEvent":
        return cls(envelope.topic, envelope.event_type, envelope.event_id, envelope.correlation_id,
                   envelope.traceparent)


class SpanRecorder:
    """Starts and ends the spans of one service's sampled calls and of its processing of traced events (the span of
    an event's cause travels in the event: bastion/events/outbox.py); `shutdown` flushes what is still batched."""

    def __init__(self, service: str, exporter: SpanExporter | None = None, root_ratio: float = 0.0,
                 processor: SpanProcessor | None = None, per_second: float = 100.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0.0 <= root_ratio <= 1.0:
            raise ValueError(f"the share of new traces to record must be between 0 and 1, not {root_ratio}")
        if per_second <= 0:
            raise ValueError(f"the span budget must be more than 0 spans a second, not {per_second}")
        if (exporter is None) == (processor is None):
            raise ValueError("give an exporter (batched) or a span processor, not both")
        self.service = service
        # Every span the kit starts is one it decided to record: the SDK's own sampling (and its OTEL_* variables)
        # must not make it a span that records nothing while the call hands on a span id of its own.
        self._provider = TracerProvider(resource=Resource.create({"service.name": service}), sampler=ALWAYS_ON)
        # The given exporter's failures are counted like those of any other (`export_also`), as "default".
        self._provider.add_span_processor(processor or BatchSpanProcessor(
            _Counted(exporter, service, "default"), schedule_delay_millis=EXPORT_EVERY_MS))  # type: ignore[arg-type]
        self._tracer = self._provider.get_tracer("bastion.grpc")
        self._root_ratio = root_ratio
        self._random = Random()  # noqa: S311 - which traces to record, not a secret
        self._per_second = per_second
        self._clock = clock
        self._tokens, self._refilled = per_second, clock()
        self._budget_lock = threading.Lock()  # the event loop and the consumer's thread both spend from it

    def wanted(self, trace: TraceContext) -> bool:
        """Whether a call of TRACE should be recorded: its caller sampled it, or it starts a trace that falls in
        the share of new traces. Ask when the call arrives (a new trace is drawn once)."""
        if trace.parent_id is None:
            return bool(self._root_ratio) and self._random.random() < self._root_ratio
        return trace.sampled

    def start(self, method: str, trace: TraceContext, started_ns: int) -> tuple[Any, TraceContext]:
        """The span of an admitted call to METHOD in TRACE that `wanted` it, begun at STARTED_NS (time.time_ns()
        when the call arrived), or None over the span budget; and the call's trace context, whose span id is the
        recorded span's (a new trace takes the span's trace id too)."""
        if not self._spend():
            SPANS_NOT_RECORDED.labels(self.service).inc()
            return None, trace
        if trace.parent_id is None:
            parent = None
        else:
            caller = otel.SpanContext(int(trace.trace_id, 16), int(trace.parent_id, 16), is_remote=True,
                                      trace_flags=otel.TraceFlags(otel.TraceFlags.SAMPLED))
            parent = otel.set_span_in_context(otel.NonRecordingSpan(caller))
        service, _, name = method.lstrip("/").partition("/")
        try:
            span = self._tracer.start_span(
                method.lstrip("/")[:MAX_SPAN_NAME], context=parent, kind=otel.SpanKind.SERVER, start_time=started_ns,
                attributes={"rpc.system": "grpc", "rpc.service": service[:MAX_SPAN_NAME],
                            "rpc.method": name[:MAX_SPAN_NAME]})
        except Exception as error:  # tracing never stops a call: the call goes on unrecorded
            log.warning("span_not_recorded", service=self.service, operation="serve", error=type(error).__name__)
            return None, trace
        if not span.is_recording():  # the SDK switched off (OTEL_SDK_DISABLED): record nothing, hand on nothing new
            return None, trace
        ids = span.get_span_context()
        return span, replace(trace, trace_id=f"{ids.trace_id:032x}", span_id=f"{ids.span_id:016x}", sampled=True)

    def calling(self, path: str, downstream: str, parent: Any, trace: TraceContext,
                correlation_id: str) -> tuple[Any, TraceContext]:
        """A CLIENT span, begun now, of a call to PATH (`/SERVICE/METHOD`) of DOWNSTREAM made on behalf of the
        recorded call whose span is PARENT, trace context TRACE and correlation id CORRELATION_ID, or None over the
        span budget; and the trace context to send with it, whose span id is the client span's (the downstream's
        span becomes its child)."""
        if not self._spend():
            SPANS_NOT_RECORDED.labels(self.service).inc()
            return None, trace
        service, _, name = path.lstrip("/").partition("/")
        try:
            span = self._tracer.start_span(
                path.lstrip("/")[:MAX_SPAN_NAME], context=otel.set_span_in_context(parent), kind=otel.SpanKind.CLIENT,
                attributes={"rpc.system": "grpc", "rpc.service": service[:MAX_SPAN_NAME],
                            "rpc.method": name[:MAX_SPAN_NAME], "server.address": downstream[:MAX_SPAN_NAME],
                            "bastion.correlation_id": correlation_id[:MAX_SPAN_NAME]})
        except Exception as error:
            log.warning("span_not_recorded", service=self.service, operation="call", error=type(error).__name__)
            return None, trace
        if not span.is_recording():
            return None, trace
        return span, replace(trace, span_id=f"{span.get_span_context().span_id:016x}")

    @staticmethod
    def call_ended(span: Any, code: grpc.StatusCode, attempts: int, failure: str | None = None) -> None:
        """End the CLIENT span SPAN (a no-op for None) of a call that ended with CODE after ATTEMPTS attempts
        (none when an open breaker or a missing service token stopped it); an error with FAILURE, the message the
        caller got, for any code but OK."""
        if span is None or not span.is_recording():
            return
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        span.set_attribute("bastion.attempts", attempts)
        if code != grpc.StatusCode.OK:
            span.set_status(otel.Status(otel.StatusCode.ERROR, (failure or code.name)[:MAX_SPAN_NAME]))
        _finish(span)

    @contextlib.contextmanager
    def processing(self, topic: str, event_type: str, event_id: str, correlation_id: str,
                   traceparent: str) -> Iterator[None]:
        """A CONSUMER span around a verified event's processing (the handler's work, one span per attempt), a child
        of the span of the call that caused the event (its signed TRACEPARENT), when that trace was sampled and the
        budget allows; nothing otherwise. Only the parsed ids of TRACEPARENT are used, never its text."""
        event = TracedEvent(topic, event_type, event_id, correlation_id, traceparent)
        span = self._event_span("process", event, None, {})
        if span is None or not span.is_recording():
            yield
            return
        try:
            yield
        except BaseException as error:
            span.set_status(otel.Status(otel.StatusCode.ERROR, type(error).__name__))
            raise
        finally:
            _finish(span)

    def events_handled(self, operation: str, events: Iterable[TracedEvent], started_ns: int, ended_ns: int,
                       failure: str | None = None, attributes: Mapping[str, str | int] | None = None) -> int:
        """One finished span, from STARTED_NS to ENDED_NS (time.time_ns()), for each of EVENTS whose trace was
        sampled, within the budget: OPERATION "send" is a PRODUCER span (the outbox relay publishing the event),
        "process" a CONSUMER span (a consumer taking it in). Each is a child of the span of the call that caused the
        event, named by its signed trace context; an error with FAILURE when it is given. Returns how many.
        Called once the events' fate is settled: a span that cannot be recorded is logged, never raised, so that
        tracing can never stop a relay or a consumer."""
        recorded = 0
        for event in events:
            span = self._event_span(operation, event, started_ns, attributes or {})
            if span is None or not span.is_recording():
                continue
            if failure is not None:
                span.set_status(otel.Status(otel.StatusCode.ERROR, failure[:MAX_SPAN_NAME]))
            recorded += _finish(span, ended_ns)
        return recorded


    def _event_span(self, operation: str, event: TracedEvent, started_ns: int | None,
                    attributes: Mapping[str, str | int]) -> Any:
        """A started span of OPERATION ("send" or "process") on EVENT, a child of the span its trace context names,
        or None: the event's trace is not sampled (or its context malformed), or the budget is spent (counted), or
        the SDK failed to start it (logged: an event is handled whether or not its span is recorded)."""
        parent = parse_traceparent(event.traceparent) if event.traceparent else None
        if parent is None or not parent[2]:
            return None
        if not self._spend():
            SPANS_NOT_RECORDED.labels(self.service).inc()
            return None
        caller = otel.SpanContext(int(parent[0], 16), int(parent[1], 16), is_remote=True,
                                  trace_flags=otel.TraceFlags(otel.TraceFlags.SAMPLED))
        kind = otel.SpanKind.PRODUCER if operation == "send" else otel.SpanKind.CONSUMER
        try:
            return self._start_event_span(operation, event, started_ns, attributes, kind, caller)
        except Exception as error:
            log.warning("span_not_recorded", service=self.service, operation=operation, error=type(error).__name__)
            return None

    def _start_event_span(self, operation: str, event: TracedEvent, started_ns: int | None,
                          attributes: Mapping[str, str | int], kind: otel.SpanKind, caller: otel.SpanContext) -> Any:
        return self._tracer.start_span(
            f"{operation} {event.topic[:MAX_SPAN_NAME]}", kind=kind, start_time=started_ns,
            context=otel.set_span_in_context(otel.NonRecordingSpan(caller)),
            attributes={"messaging.system": "kafka", "messaging.operation.type": operation,
                        "messaging.destination.name": event.topic[:MAX_SPAN_NAME],
                        "bastion.event_type": event.event_type[:MAX_SPAN_NAME],
                        "bastion.event_id": event.event_id[:MAX_SPAN_NAME],
                        "bastion.correlation_id": event.correlation_id[:MAX_SPAN_NAME], **attributes})

    def _spend(self) -> bool:
        """One span from the budget (a token bucket of PER_SECOND a second, as many at most in store)."""
        with self._budget_lock:
            now = self._clock()
            self._tokens = min(self._per_second, self._tokens + (now - self._refilled) * self._per_second)
            self._refilled = now
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True

    @staticmethod
    def end(span: Any, code: grpc.StatusCode, correlation_id: str, peer_identity: str | None) -> None:
        """End SPAN (a no-op for None or a span already ended) with the call's status CODE."""
        if span is None or not span.is_recording():
            return
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        span.set_attribute("bastion.correlation_id", correlation_id)
        if peer_identity:
            span.set_attribute("bastion.peer_service", peer_identity)
        if code in SERVER_ERRORS:
            span.set_status(otel.Status(otel.StatusCode.ERROR, code.name))
        _finish(span)

    def export_also(self, exporter: SpanExporter, name: str) -> None:
        """Send the spans to EXPORTER as well, batched on a thread of its own; its failures are counted under NAME."""
        self._provider.add_span_processor(BatchSpanProcessor(_Counted(exporter, self.service, name),
                                                             schedule_delay_millis=EXPORT_EVERY_MS))

    def shutdown(self) -> None:
        self._provider.shutdown()


class _Counted(SpanExporter):
    """EXPORTER, with the spans of each batch it could not deliver counted."""

    def __init__(self, exporter: SpanExporter, service: str, name: str) -> None:
        self._exporter = exporter
        self._not_exported = SPANS_NOT_EXPORTED.labels(service, name)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._exporter.export(spans)
        except Exception:  # not delivered either: counted, and logged by the SDK's batch processor
            self._not_exported.inc(len(spans))
            raise
        if result is not SpanExportResult.SUCCESS:
            self._not_exported.inc(len(spans))
        return result

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._exporter.force_flush(timeout_millis)


def _finish(span: Any, ended_ns: int | None = None) -> bool:
    """End SPAN; whether it was handed to the exporter. A failure of the SDK or the exporter is logged, never
    raised: a call or an event is handled whether or not its span is recorded."""
    try:
        span.end(end_time=ended_ns)
    except Exception as error:
        log.warning("span_not_recorded", span=str(span.name)[:MAX_SPAN_NAME], error=type(error).__name__)
        return False
    return True


def jsonl_exporter(path: Path, max_bytes: int = SPAN_FILE_BYTES, kept: int = SPAN_FILES_KEPT) -> SpanExporter:
    """An exporter that appends each span to PATH as one line of JSON (OpenTelemetry's own span encoding), the file
    rotated at MAX_BYTES with KEPT older ones (PATH.1 the newest of them; the standard library's rotation)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = cast(IO[str], _RotatingLines(path, max_bytes, kept))  # a text stream, as the exporter needs
    return ConsoleSpanExporter(out=lines, formatter=_one_line)


def written_spans(log_dir: Path, services: Iterable[str], containing: str = ""
                  ) -> Iterator[tuple[str, dict[str, Any]]]:
    """(service, span) for every span SERVICES wrote to their span files in LOG_DIR, the rotated ones first (oldest
    to newest), as the SDK encodes them, once each (a rotation while they are read may show a span twice); only
    lines CONTAINING the given text are parsed (a trace or correlation id: the files can be large); a line not
    (yet) complete JSON is skipped."""
    for service in services:
        current = log_dir / f"{service}.spans.jsonl"
        rotated = sorted((path for path in log_dir.glob(f"{service}.spans.jsonl.*") if ROTATED.fullmatch(path.suffix)),
                         key=lambda path: int(path.suffix[1:]), reverse=True)
        seen: set[object] = set()
        for path in [*rotated, current]:
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except FileNotFoundError:  # not written yet, or rotated away meanwhile
                continue
            for line in text.splitlines():
                if containing not in line:
                    continue
                try:
                    span = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(span, dict) or not isinstance(span.get("context"), dict):
                    continue
                span_id = span["context"].get("span_id")
                if span_id not in seen:
                    seen.add(span_id)
                    yield service, span


def recorded_spans(log_dir: Path, services: Iterable[str], trace_id: str) -> list[dict[str, Any]]:
    """The spans of TRACE_ID (32 hex digits) that SERVICES wrote (`written_spans`)."""
    return [span for _service, span in written_spans(log_dir, services, trace_id)
            if span["context"].get("trace_id") == f"0x{trace_id}"]


def started_at(span: dict[str, Any]) -> dt.datetime:
    return dt.datetime.fromisoformat(span["start_time"])


def milliseconds(span: dict[str, Any]) -> float:
    """How long a written span lasted, in milliseconds."""
    return (dt.datetime.fromisoformat(span["end_time"]) - started_at(span)) / dt.timedelta(milliseconds=1)


class _RotatingLines(io.TextIOBase):
    """A text stream that hands each line to a RotatingFileHandler, for an exporter that writes to a stream."""

    def __init__(self, path: Path, max_bytes: int, kept: int) -> None:
        super().__init__()
        self._handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=kept,
                                                             encoding="utf-8")
        # A failure to write or rotate (a full disk, a name taken) is raised to the exporter, not printed to standard
        # error and passed over as the handler does by default: the spans lost are then counted (`_Counted`).
        self._handler.handleError = _raise_again  # type: ignore[method-assign,assignment]
        self._handler.setFormatter(logging.Formatter("%(message)s"))

    def write(self, text: str) -> int:
        for line in text.splitlines():
            self._handler.emit(logging.makeLogRecord({"msg": line}))
        return len(text)

    def flush(self) -> None:
        self._handler.flush()


def _raise_again(_record: logging.LogRecord) -> None:
    raise  # called by the handler's emit while it handles its failure: that failure, raised again


def _one_line(span: ReadableSpan) -> str:
    return str(span.to_json(indent=None)) + "\n"
