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
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.parser import text_string_to_metric_families

from bastion.grpc.server import TlsFiles

SCRAPE_TIMEOUT = 5.0


HANDSHAKE_SECONDS = 5.0


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a line on stderr each."""


class _TlsServer(ThreadingMixIn, WSGIServer):
    """Accepts plain TCP and does the TLS handshake in each connection's own thread, under a timeout: a client
    that connects and says nothing holds only its own thread for HANDSHAKE_SECONDS, never the accept loop
    (prometheus_client's own TLS server handshakes inside accept, so one idle socket stalled every scrape and
    shutdown)."""

    daemon_threads = True
    tls: ssl.SSLContext

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            request.settimeout(HANDSHAKE_SECONDS)
            secured = self.tls.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):  # no certificate, another CA, plaintext, or silence: nothing served
            self.shutdown_request(request)
            return
        super().process_request_thread(secured, client_address)


@dataclass
class MetricsEndpoint:
    server: WSGIServer
    thread: threading.Thread
    url: str

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def server_context(tls: TlsFiles) -> ssl.SSLContext:
    """TLS 1.2 or later with the service's certificate; a client certificate of the dev CA required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert), str(tls.key))
    context.load_verify_locations(cafile=str(tls.ca))
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def serve_metrics(host: str, port: int, tls: TlsFiles) -> MetricsEndpoint:
    """Serve this process's default registry at https://HOST:PORT/metrics, client certificate required."""
    server = make_server(host, port, make_wsgi_app(), server_class=_TlsServer, handler_class=_QuietHandler)
    server.tls = server_context(tls)
    thread = threading.Thread(target=server.serve_forever, name="metrics-endpoint", daemon=True)
    thread.start()
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
