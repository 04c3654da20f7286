"""A service's runtime (bastion/runtime.py) on its way out: once SIGTERM stops the server, the access decisions still
queued are published or counted lost (the audit is closed), not left to die with the process."""

import asyncio
import signal
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bastion import runtime as runtime_module
from bastion.runtime import ServiceRuntime

INFRA = Path(__file__).resolve().parents[2] / "infra"
SERVICE = "accounts"


class SpyAudit:
    def __init__(self, *_: Any) -> None:
        self.closed_when: list[str] = []

    def record(self, _decision: Any) -> None: ...

    def close(self, _timeout: float = 10.0) -> None:
        self.closed_when.append("closed")


class Server:
    def __init__(self, audits: list[SpyAudit]) -> None:
        self.audits = audits
        self.stopped_with_audit_open = False

    async def stop(self, _grace: float) -> None:
        self.stopped_with_audit_open = all(not audit.closed_when for audit in self.audits)


@pytest.fixture
def service(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ServiceRuntime:
    monkeypatch.setattr(runtime_module, "KafkaAccessAudit", SpyAudit)
    monkeypatch.setattr(runtime_module.JwksCache, "from_url",
                        classmethod(lambda cls, *_a, **_k: SimpleNamespace(start_background_refresh=lambda: None)))
    monkeypatch.setattr(runtime_module, "Keycloak", lambda ctx: SimpleNamespace(issuer="https://kc/realms/bastion"))
    monkeypatch.setattr(runtime_module.aioredis, "Redis",
                        lambda **_options: SimpleNamespace(register_script=lambda _script: None))
    monkeypatch.setattr(runtime_module.ssl, "create_default_context", lambda **_options: None)
    monkeypatch.setattr(runtime_module, "serve_metrics",
                        lambda *_a, **_k: SimpleNamespace(url="https://localhost/metrics", close=lambda: None))
    ctx = SimpleNamespace(
        settings=SimpleNamespace(infra_dir=INFRA, bind_host="127.0.0.1"),
        pki=SimpleNamespace(paths=lambda name: SimpleNamespace(cert=tmp_path / "c.pem", key=tmp_path / "k.pem")),
        ca_file=tmp_path / "ca.pem", credentials=SimpleNamespace(redis={SERVICE: "generated"}),
        redis_options=lambda user, password: {}, metrics_port=lambda name: 0, grpc_port=lambda name: 0)
    runtime = ServiceRuntime(SERVICE, ctx, engine=None, key=None, kafka_config={})  # type: ignore[arg-type]
    runtime.__dict__["spans"] = SimpleNamespace(shutdown=lambda: None)
    return runtime


def stopped_by_sigterm(service: ServiceRuntime, server: Server, stop: threading.Event) -> None:
    """Serve until SIGTERM, "sent" by calling the handler the runtime installs: the handlers are kept, not
    installed, so no real signal can ever reach the test run."""

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        handlers: dict[int, Any] = {}
        loop.add_signal_handler = lambda sig, handler, *args: handlers.__setitem__(sig, handler)  # type: ignore[method-assign]
        loop.call_later(0.1, lambda: handlers[signal.SIGTERM]())
        await service.serve_until_stopped(server, 0, stop)  # type: ignore[arg-type]

    asyncio.run(serve())


def test_the_access_audit_the_chain_records_into_is_closed_once_sigterm_has_stopped_the_server(
        service: ServiceRuntime) -> None:
    security = service.security()
    assert isinstance(security.audit, SpyAudit) and security.audit is service.access_audit
    server = Server([security.audit])
    stopped_by_sigterm(service, server, threading.Event())
    assert security.audit.closed_when == ["closed"]
    assert server.stopped_with_audit_open, "closed after the last call was served, not before"


def test_an_access_audit_that_fails_to_close_leaves_the_rest_of_the_shutdown_to_run(
        service: ServiceRuntime) -> None:
    security = service.security()
    spans_flushed: list[bool] = []
    service.__dict__["spans"] = SimpleNamespace(shutdown=lambda: spans_flushed.append(True))

    def close(_timeout: float = 10.0) -> None:
        raise RuntimeError("librdkafka gave up")

    security.audit.close = close  # type: ignore[method-assign]
    stop = threading.Event()
    stopped_by_sigterm(service, Server([]), stop)
    assert stop.is_set() and spans_flushed == [True], "the workers told to stop, the spans still flushed"
