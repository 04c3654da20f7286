"""A service's runtime (bastion/runtime.py) on its way out: once SIGTERM stops the server, the access decisions still
queued are published or counted lost (the audit is closed), not left to die with the process."""

import asyncio
import os
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

    def close(self) -> None:
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


def test_the_access_audit_the_chain_records_into_is_closed_once_sigterm_has_stopped_the_server(
        service: ServiceRuntime) -> None:
    security = service.security()
    assert isinstance(security.audit, SpyAudit) and security.audit is service.access_audit
    server = Server([security.audit])

    async def serve() -> None:
        asyncio.get_running_loop().call_later(0.1, os.kill, os.getpid(), signal.SIGTERM)
        await service.serve_until_stopped(server, 0, threading.Event())  # type: ignore[arg-type]

    asyncio.run(serve())
    assert security.audit.closed_when == ["closed"]
    assert server.stopped_with_audit_open, "closed after the last call was served, not before"
