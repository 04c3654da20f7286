"""Recorded spans of the calls a service serves, with OpenTelemetry's SDK, for the traces that are sampled.

The kit carries W3C trace context on every call (bastion/grpc/trace.py). A span is recorded only for a call whose
trace is sampled: its caller's `traceparent` says so (flag 01), or the call starts a trace and falls in the share
of new traces set by BASTION_TRACE_SAMPLE_RATIO (0 by default, so that recording is the caller's choice). Any
other call costs a flag test. A recorded span is a SERVER span named by the method, a child of the caller's span,
with the RPC attributes of OpenTelemetry's semantic conventions, the gRPC status, the correlation id and the
caller's service identity. Its id is the span id the handler's downstream calls name as their parent, so the
spans one request leaves in several services form one tree.

The SDK batches finished spans to an exporter on a thread of its own: the services of the dev stack write one
JSON object per line to `logs/SERVICE.spans.jsonl` in the state folder (`jsonl_exporter`); any other
`SpanExporter` (OTLP to a collector) plugs in instead.
"""

from dataclasses import replace
from pathlib import Path
from random import Random
from typing import Any

import grpc
from opentelemetry import trace as otel
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from bastion.grpc.trace import TraceContext

# A server span's status is an error only for these codes (OpenTelemetry's semantic conventions for gRPC): the
# others are answers to the caller's request, not failures of the server.
SERVER_ERRORS = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
                           grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE,
                           grpc.StatusCode.DATA_LOSS})
MAX_SPAN_NAME = 256  # an unknown method's path is the caller's own text


class SpanRecorder:
    """Starts and ends the spans of one service's sampled calls; `shutdown` flushes what is still batched."""

    def __init__(self, service: str, exporter: SpanExporter | None = None, root_ratio: float = 0.0,
                 processor: SpanProcessor | None = None) -> None:
        if not 0.0 <= root_ratio <= 1.0:
            raise ValueError(f"the share of new traces to record must be between 0 and 1, not {root_ratio}")
        if (exporter is None) == (processor is None):
            raise ValueError("give an exporter (batched) or a span processor, not both")
        self._provider = TracerProvider(resource=Resource.create({"service.name": service}))
        self._provider.add_span_processor(processor or BatchSpanProcessor(exporter))  # type: ignore[arg-type]
        self._tracer = self._provider.get_tracer("bastion.grpc")
        self._root_ratio = root_ratio
        self._random = Random()  # noqa: S311 - which traces to record, not a secret

    def start(self, method: str, trace: TraceContext) -> tuple[Any, TraceContext]:
        """The span of a call to METHOD in TRACE, or None when the trace is not recorded; and the call's trace
        context, whose span id is the recorded span's (a new trace takes the span's trace id too)."""
        if trace.parent_id is None:
            if not self._root_ratio or self._random.random() >= self._root_ratio:
                return None, trace
            parent = None
        elif not trace.sampled:
            return None, trace
        else:
            caller = otel.SpanContext(int(trace.trace_id, 16), int(trace.parent_id, 16), is_remote=True,
                                      trace_flags=otel.TraceFlags(otel.TraceFlags.SAMPLED))
            parent = otel.set_span_in_context(otel.NonRecordingSpan(caller))
        service, _, name = method.lstrip("/").partition("/")
        span = self._tracer.start_span(method.lstrip("/")[:MAX_SPAN_NAME] or "unknown", context=parent,
                                       kind=otel.SpanKind.SERVER,
                                       attributes={"rpc.system": "grpc", "rpc.service": service[:MAX_SPAN_NAME],
                                                   "rpc.method": name[:MAX_SPAN_NAME]})
        ids = span.get_span_context()
        return span, replace(trace, trace_id=f"{ids.trace_id:032x}", span_id=f"{ids.span_id:016x}", sampled=True)

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
        span.end()

    def shutdown(self) -> None:
        self._provider.shutdown()


def jsonl_exporter(path: Path) -> SpanExporter:
    """An exporter that appends each span to PATH as one line of JSON (OpenTelemetry's own span encoding)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stream = path.open("a", encoding="utf-8")
    return ConsoleSpanExporter(out=stream, formatter=_one_line)


def _one_line(span: ReadableSpan) -> str:
    return str(span.to_json(indent=None)) + "\n"
