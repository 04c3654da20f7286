"""The metrics endpoint on a real loopback TLS socket: served to a dev-CA client certificate, refused to a client
without one, to one from another CA, and to plaintext HTTP."""

import contextlib
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import Counter

from bastion import metrics_endpoint
from bastion.devstack.pki import DevPki
from bastion.grpc.server import TlsFiles
from bastion.metrics_endpoint import MetricsEndpoint, sample_value, scrape, serve_metrics

PROBED = Counter("bastion_test_metrics_endpoint_probes_total", "Probes of the metrics endpoint test", ["reason"])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def tls_of(pki: DevPki, name: str) -> TlsFiles:
    paths = pki.paths(name)
    return TlsFiles(paths.cert, paths.key, pki.ca_file)


@pytest.fixture()
def pki(tmp_path: Path) -> DevPki:
    pki = DevPki(tmp_path / "pki", leaf_days=7, reissue_when_days_left=2)
    pki.ensure(["accounts", "cli"])
    return pki


@pytest.fixture()
def endpoint(pki: DevPki) -> Iterator[MetricsEndpoint]:
    served = serve_metrics("127.0.0.1", free_port(), tls_of(pki, "accounts"))
    yield served
    served.close()


def test_a_dev_ca_client_reads_the_counters(endpoint: MetricsEndpoint, pki: DevPki) -> None:
    PROBED.labels("too_large").inc(3)
    text = scrape(endpoint.url, tls_of(pki, "cli"))
    assert sample_value(text, "bastion_test_metrics_endpoint_probes_total", {"reason": "too_large"}) == 3.0
    assert sample_value(text, "bastion_test_metrics_endpoint_probes_total", {"reason": "other"}) is None


def test_a_client_without_a_certificate_is_refused(endpoint: MetricsEndpoint, pki: DevPki) -> None:
    no_certificate = ssl.create_default_context(cafile=str(pki.ca_file))
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(endpoint.url, timeout=5, context=no_certificate).read()  # noqa: S310


def test_a_certificate_of_another_ca_is_refused(endpoint: MetricsEndpoint, pki: DevPki, tmp_path: Path) -> None:
    other = DevPki(tmp_path / "other", leaf_days=7, reissue_when_days_left=2)
    other.ensure(["cli"])
    foreign = ssl.create_default_context(cafile=str(pki.ca_file))  # trusts the server, but presents a stranger
    foreign.load_cert_chain(str(other.paths("cli").cert), str(other.paths("cli").key))
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(endpoint.url, timeout=5, context=foreign).read()  # noqa: S310


def test_plaintext_http_gets_no_metrics(endpoint: MetricsEndpoint) -> None:
    plain = endpoint.url.replace("https://", "http://")
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)) as refused:
        urllib.request.urlopen(plain, timeout=5).read()  # noqa: S310
    assert "bastion_" not in str(refused.value)


def test_a_silent_connection_stalls_neither_scrapes_nor_shutdown(pki: DevPki) -> None:
    """The handshake runs in each connection's thread under a timeout, not in the accept loop."""
    served = serve_metrics("127.0.0.1", free_port(), tls_of(pki, "accounts"))
    port = int(served.url.rsplit(":", 1)[1].split("/")[0])
    silent = socket.create_connection(("127.0.0.1", port))  # no certificate, no handshake, no bytes
    try:
        started = time.monotonic()
        assert "python_info" in scrape(served.url, tls_of(pki, "cli"))
        assert time.monotonic() - started < 2
        closing = threading.Thread(target=served.close)
        closing.start()
        closing.join(3)
        assert not closing.is_alive()
    finally:
        silent.close()


def test_a_connection_that_never_completes_a_handshake_is_closed_after_the_timeout_without_a_thread_failing(
        pki: DevPki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_endpoint, "HANDSHAKE_SECONDS", 0.3)
    failed: list[object] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: failed.append(args.exc_type))
    served = serve_metrics("127.0.0.1", free_port(), tls_of(pki, "accounts"))
    port = int(served.url.rsplit(":", 1)[1].split("/")[0])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as silent, \
                socket.create_connection(("127.0.0.1", port), timeout=5) as plaintext:
            plaintext.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            started = time.monotonic()
            assert silent.recv(1) == b"", "closed by the server"
            assert time.monotonic() - started < 3
            with contextlib.suppress(ConnectionResetError):
                assert plaintext.recv(1024) == b""
        time.sleep(0.2)  # the connections' threads end
        assert failed == []
    finally:
        served.close()


def test_a_closed_endpoint_listens_no_more_and_its_thread_never_holds_the_process(pki: DevPki) -> None:
    served = serve_metrics("127.0.0.1", free_port(), tls_of(pki, "accounts"))
    port = int(served.url.rsplit(":", 1)[1].split("/")[0])
    served.close()
    assert not served.thread.is_alive()
    assert served.thread.daemon, "an endpoint left open never keeps its process from exiting"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_a_scrape_of_an_endpoint_that_never_answers_gives_up(pki: DevPki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_endpoint, "SCRAPE_TIMEOUT", 0.3)
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen()  # connections are taken by the kernel, never answered
    outcome: list[BaseException] = []

    def scraping() -> None:
        try:
            scrape(f"https://127.0.0.1:{mute.getsockname()[1]}/metrics", tls_of(pki, "cli"))
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=scraping, daemon=True)
    try:
        thread.start()
        thread.join(3)
        assert not thread.is_alive() and outcome and isinstance(outcome[0], (TimeoutError, urllib.error.URLError))
    finally:
        mute.close()


def test_neither_a_scrape_nor_a_handshake_waits_longer_than_five_seconds() -> None:
    assert 0 < metrics_endpoint.SCRAPE_TIMEOUT <= 5
    assert 0 < metrics_endpoint.HANDSHAKE_SECONDS <= 5


def test_a_sample_is_found_by_exactly_its_labels() -> None:
    exposition = ('# TYPE bastion_calls_refused_total counter\n'
                  'bastion_calls_refused_total{code="PERMISSION_DENIED",service="payments"} 2.0\n'
                  'bastion_calls_refused_total{code="PERMISSION_DENIED"} 1.0\n')
    assert sample_value(exposition, "bastion_calls_refused_total", {"code": "PERMISSION_DENIED"}) == 1.0
    assert sample_value(exposition, "bastion_calls_refused_total",
                        {"code": "PERMISSION_DENIED", "service": "payments"}) == 2.0
    assert sample_value(exposition, "bastion_calls_refused_total", {"code": "NOT_FOUND"}) is None
