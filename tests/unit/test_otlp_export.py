"""Spans to an OpenTelemetry collector (BASTION_TRACE_OTLP_ENDPOINT): a real OTLP/gRPC receiver on loopback gets a
service's spans over mutual TLS, sees the service's certificate, and a collector the dev CA does not vouch for gets
nothing, counted. The endpoint is HOST:PORT only: no scheme can turn the export into plaintext."""

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY
from pydantic import ValidationError

from bastion.devstack.pki import CertificateAuthority, create_ca, issue_certificate
from bastion.grpc.otlp import otlp_exporter
from bastion.grpc.server import TlsFiles
from bastion.grpc.spans import SpanRecorder
from bastion.grpc.trace import trace_context_from
from bastion.settings import DevstackSettings

SAMPLED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def written(folder: Path, ca: CertificateAuthority, name: str) -> TlsFiles:
    """NAME's certificate and key from CA, and CA's certificate, as files (what a TlsFiles points at)."""
    cert, key = issue_certificate(ca, name, days=1)
    paths = TlsFiles(folder / f"{name}.pem", folder / f"{name}-key.pem", folder / f"{name}-ca.pem")
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    paths.ca.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    return paths


class Collector(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    """An OTLP/gRPC receiver that keeps what it is sent and the SPIFFE id of whoever sent it."""

    def __init__(self) -> None:
        self.received: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.senders: list[str] = []

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.received.append(request)
        self.senders += [name.decode() for name in context.auth_context().get("peer_spiffe_id", [])]
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture()
def collector(tmp_path: Path) -> Iterator[tuple[Collector, int, CertificateAuthority]]:
    """A collector on loopback whose certificate a CA of its own vouches for, requiring a client certificate of it."""
    ca = create_ca("test collector CA")
    tls = written(tmp_path, ca, "collector")
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    found = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(found, server)
    credentials = grpc.ssl_server_credentials([(tls.key.read_bytes(), tls.cert.read_bytes())],
                                              root_certificates=tls.ca.read_bytes(), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield found, port, ca
    server.stop(0)


def recorder_exporting_to(endpoint: str, tls: TlsFiles) -> SpanRecorder:
    recorder = SpanRecorder("payments", processor=SimpleSpanProcessor(InMemorySpanExporter()))
    recorder.export_also(otlp_exporter(endpoint, tls, timeout_seconds=2.0), "otlp")
    return recorder


def record_a_call(recorder: SpanRecorder) -> None:
    trace = trace_context_from([("traceparent", SAMPLED)])
    assert recorder.wanted(trace)
    span, _ = recorder.start("/bastion.payments.v1.Payments/Transfer", trace, time.time_ns())
    recorder.end(span, grpc.StatusCode.OK, "corr-otlp-1", "spiffe://bastion.local/service/cli")
    recorder.shutdown()  # flushes the batch


def not_exported() -> float:
    return REGISTRY.get_sample_value("bastion_spans_not_exported_total",
                                     {"service": "payments", "exporter": "otlp"}) or 0.0


def test_a_collector_gets_the_services_spans_over_mutual_tls(collector: tuple[Collector, int, CertificateAuthority],
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")  # the SDK's own switch to plaintext: not obeyed
    found, port, ca = collector
    record_a_call(recorder_exporting_to(f"localhost:{port}", written(tmp_path, ca, "payments")))
    [request] = found.received
    [resource_spans] = request.resource_spans
    service_name = {a.key: a.value.string_value for a in resource_spans.resource.attributes}["service.name"]
    [span] = [span for scope in resource_spans.scope_spans for span in scope.spans]
    assert (service_name, span.name) == ("payments", "bastion.payments.v1.Payments/Transfer")
    assert span.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert found.senders == ["spiffe://bastion.local/service/payments"], "the collector saw the service's certificate"


def test_a_collector_the_ca_does_not_vouch_for_gets_nothing_and_the_spans_are_counted(
        collector: tuple[Collector, int, CertificateAuthority], tmp_path: Path) -> None:
    found, port, _ = collector
    before = not_exported()
    record_a_call(recorder_exporting_to(f"localhost:{port}", written(tmp_path, create_ca("another CA"), "payments")))
    assert found.received == []
    assert not_exported() == before + 1


@pytest.mark.parametrize("endpoint", ["http://localhost:4317", "https://localhost:4317", "localhost", ":4317",
                                      "localhost:4317/v1/traces", "local host:4317"])
def test_an_endpoint_that_is_not_host_and_port_is_refused(endpoint: str) -> None:
    with pytest.raises(ValidationError, match="trace_otlp_endpoint"):
        DevstackSettings(trace_otlp_endpoint=endpoint)
    assert DevstackSettings(trace_otlp_endpoint="collector.local:4317").trace_otlp_endpoint == "collector.local:4317"
