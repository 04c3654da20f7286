"""Spans to an OpenTelemetry collector (BASTION_TRACE_OTLP_ENDPOINT), the way every other connection of the platform
goes: mutual TLS with the dev CA, never plaintext."""

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import SpanExporter

from bastion.grpc.channels import channel_credentials
from bastion.grpc.server import TlsFiles


def otlp_exporter(endpoint: str, tls: TlsFiles, timeout_seconds: float = 10.0) -> SpanExporter:
    """Spans to the OTLP/gRPC receiver of a collector at ENDPOINT (HOST:PORT), over mutual TLS only: TLS's CA must
    vouch for the collector's certificate (for HOST), and the collector is shown TLS's certificate. Never plaintext,
    whatever OTEL_EXPORTER_OTLP_INSECURE says."""
    return OTLPSpanExporter(endpoint=endpoint, insecure=False, credentials=channel_credentials(tls),
                            timeout=timeout_seconds)
