"""Each service's Prometheus counters, served over HTTPS with a client certificate required.

The counters (refused calls by code, rejected events by reason, lost access decisions, ...) are what an
operator watches; "no plaintext listener" holds for them too: the endpoint speaks TLS 1.2+ with the service's
own certificate, on loopback, and answers only clients presenting a certificate of the dev CA (the `cli`
identity, or another service's). `scrape` is the client side, for `bastion metrics` and the tests.
"""

import ssl
import threading
import urllib.request
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.parser import text_string_to_metric_families

from bastion.grpc.server import TlsFiles

SCRAPE_TIMEOUT = 5.0


@dataclass
class MetricsEndpoint:
    server: WSGIServer
    thread: threading.Thread
    url: str

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def serve_metrics(host: str, port: int, tls: TlsFiles) -> MetricsEndpoint:
    """Serve this process's default registry at https://HOST:PORT/metrics, client certificate required."""
    server, thread = start_http_server(
        port, addr=host, certfile=str(tls.cert), keyfile=str(tls.key), client_cafile=str(tls.ca),
        client_auth_required=True, tls_min_version=ssl.TLSVersion.TLSv1_2,
    )
    return MetricsEndpoint(server, thread, f"https://{host}:{port}/metrics")


def client_context(tls: TlsFiles) -> ssl.SSLContext:
    """Trust the dev CA only, and present TLS's certificate (the client's identity)."""
    context = ssl.create_default_context(cafile=str(tls.ca))
    context.load_cert_chain(str(tls.cert), str(tls.key))
    return context


def scrape(url: str, tls: TlsFiles) -> str:
    """The exposition text at URL, fetched presenting the certificate of TLS."""
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT, context=client_context(tls)) as answer:  # noqa: S310
        text: str = answer.read().decode()
        return text


def sample_value(exposition: str, name: str, labels: dict[str, str]) -> float | None:
    """The value of the sample NAME{LABELS} (exactly those labels) in an exposition text, or None."""
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None
