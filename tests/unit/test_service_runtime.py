"""A service's runtime (bastion/runtime.py): the security chain it wires for its server, its background workers
(rebuilt after a failure, reported to the health check), and its way out: once SIGTERM stops the server, the access
decisions still queued are published or counted lost (the audit is closed), not left to die with the process."""

import asyncio
import inspect
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from grpc_health.v1 import health_pb2
from structlog.testing import capture_logs

from bastion import runtime as runtime_module
from bastion.devstack.errors import DevstackError
from bastion.devstack.process import ProcessSupervisor
from bastion.grpc.ratelimit import RateLimit
from bastion.grpc.server import TlsFiles
from bastion.grpc.tokens import jwks_url
from bastion.runtime import (
    ACCESS_AUDIT_CLOSE_SECONDS,
    DEFAULT_RATE_LIMIT,
    SERVICE_ACCOUNT_RATE_LIMIT,
    WORKER_STOP_SECONDS,
    ServiceRuntime,
)

INFRA = Path(__file__).resolve().parents[2] / "infra"
SERVICE = "accounts"


class SpyAudit:
    def __init__(self, *_: Any) -> None:
        self.closed_when: list[str] = []
        self.timeouts: list[float] = []

    def record(self, _decision: Any) -> None: ...

    def close(self, timeout: float = 10.0) -> None:
        self.closed_when.append("closed")
        self.timeouts.append(timeout)


class Server:
    def __init__(self, audits: list[SpyAudit], workers: threading.Event | None = None) -> None:
        self.audits = audits
        self.workers = workers  # the event that stops the workers
        self.stopped_with_audit_open = False
        self.stopped_with_workers_running = False

    async def stop(self, _grace: float) -> None:
        self.stopped_with_audit_open = all(not audit.closed_when for audit in self.audits)
        self.stopped_with_workers_running = self.workers is not None and not self.workers.is_set()


@pytest.fixture
def service(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ServiceRuntime:
    monkeypatch.setattr(runtime_module, "KafkaAccessAudit", SpyAudit)
    monkeypatch.setattr(runtime_module.JwksCache, "from_url",
                        classmethod(lambda cls, *_a, **_k: SimpleNamespace(start_background_refresh=lambda: None)))
    monkeypatch.setattr(runtime_module, "Keycloak", lambda ctx: SimpleNamespace(issuer="https://kc/realms/bastion",
                                                                              access_token_lifespan_seconds=300))
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


def stopped_by_sigterm(service: ServiceRuntime, server: Server, stop: threading.Event,
                       signum: int = signal.SIGTERM) -> None:
    """Serve until SIGTERM (or SIGNUM), "sent" by calling the handler the runtime installs: the handlers are kept,
    not installed, so no real signal can ever reach the test run."""

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        handlers: dict[int, Any] = {}
        loop.add_signal_handler = lambda sig, handler, *args: handlers.__setitem__(sig, handler)  # type: ignore[method-assign]
        loop.call_later(0.1, lambda: handlers[signum]())
        await asyncio.wait_for(service.serve_until_stopped(server, 0, stop), 5)  # type: ignore[arg-type]

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


def test_a_service_missing_its_database_or_its_kafka_secret_does_not_start(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    for postgres, kafka in (({}, {SERVICE: "k"}), ({SERVICE: "p"}, {})):
        ctx = SimpleNamespace(credentials=SimpleNamespace(postgres=postgres, kafka=kafka),
                              layout=SimpleNamespace(credentials_file=tmp_path / "credentials.json"))
        monkeypatch.setattr(runtime_module, "Stack", lambda *_a, _ctx=ctx, **_k: SimpleNamespace(context=lambda: _ctx))
        with pytest.raises(DevstackError, match=f"no secrets for service '{SERVICE}'"):
            ServiceRuntime.load(SERVICE, settings=None)  # type: ignore[arg-type]


def test_the_security_chain_is_this_services_own_tokens_policy_limits_and_certificate(
        service: ServiceRuntime, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fetched: dict[str, Any] = {}
    refreshing: list[bool] = []

    def from_url(_cls: Any, url: str, ssl_context: Any, **_options: Any) -> SimpleNamespace:
        fetched.update(url=url, trusted=ssl_context)
        return SimpleNamespace(start_background_refresh=lambda: refreshing.append(True))

    monkeypatch.setattr(runtime_module.JwksCache, "from_url", classmethod(from_url))
    monkeypatch.setattr(runtime_module.ssl, "create_default_context", lambda **options: options)
    redis_users: list[tuple[str, str]] = []
    service.ctx.redis_options = lambda user, password: redis_users.append((user, password)) or {}  # type: ignore[misc]

    security = service.security(RateLimit(calls=5, window_seconds=1))

    assert security.service == SERVICE and security.validator.audience == SERVICE
    assert fetched == {"url": jwks_url("https://kc/realms/bastion"), "trusted": {"cafile": str(tmp_path / "ca.pem")}}
    assert refreshing == [True], "the realm's keys are followed, so a rotation needs no restart"
    assert security.policy.service == "bastion.accounts.v1.Accounts"
    assert security.limiter is not None and security.limiter.service == SERVICE
    assert (security.limiter.limit, security.limiter.service_limit) == (RateLimit(5, 1), SERVICE_ACCOUNT_RATE_LIMIT)
    assert redis_users == [(SERVICE, "generated")]
    assert security.spans is service.spans
    assert security.tls == TlsFiles(tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem")
    assert service.security().limiter.limit == DEFAULT_RATE_LIMIT  # type: ignore[union-attr]


class Worker:
    """A worker that fails each run (the database away) and fails to close too, until the third run stops it."""

    def __init__(self, seen: list[str], stop: threading.Event) -> None:
        self.seen, self.stop = seen, stop

    def run(self, _stop: threading.Event) -> None:
        self.seen.append("ran")
        if self.seen.count("ran") == 3:
            self.stop.set()
        raise ConnectionError("database away")

    def close(self) -> None:
        self.seen.append("closed")
        raise RuntimeError("a broken client does not close cleanly")


def test_a_failing_worker_is_closed_rebuilt_and_reported_failing(service: ServiceRuntime,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_module, "WORKER_RESTART_SECONDS", 0.01)
    seen: list[str] = []
    stop = threading.Event()
    thread = service.start_worker("outbox-relay", lambda: Worker(seen, stop), stop)
    thread.join(5)
    assert not thread.is_alive() and service.threads == [thread]
    assert seen == ["ran", "closed"] * 3, "a close that fails does not end the restart loop"
    assert service.workers.failing(time.monotonic()) == ["outbox-relay"]


def test_the_workers_wind_down_before_the_spans_are_flushed_and_the_metrics_endpoint_closes(
        service: ServiceRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    monkeypatch.setattr(runtime_module, "serve_metrics", lambda *_a, **_k: SimpleNamespace(
        url="https://localhost/metrics", close=lambda: order.append("metrics closed")))
    service.__dict__["spans"] = SimpleNamespace(shutdown=lambda: order.append("spans flushed"))

    class Slow:
        def run(self, stop: threading.Event) -> None:
            stop.wait()
            time.sleep(0.2)  # a consumer leaving its group

        def close(self) -> None:
            order.append("worker closed")

    stop = threading.Event()
    service.start_worker("consumer", Slow, stop)
    stopped_by_sigterm(service, Server([]), stop)
    assert order == ["worker closed", "spans flushed", "metrics closed"]


def test_a_worker_that_does_not_stop_holds_the_shutdown_no_longer_than_its_deadline(
        service: ServiceRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_module, "WORKER_STOP_SECONDS", 0.2)
    stuck = threading.Event()

    class Stuck:
        def run(self, _stop: threading.Event) -> None:
            stuck.wait(5)

        def close(self) -> None: ...

    stop = threading.Event()
    service.start_worker("consumer", Stuck, stop)
    started = time.monotonic()
    try:
        stopped_by_sigterm(service, Server([]), stop)
        assert time.monotonic() - started < 2
    finally:
        stuck.set()


def test_the_workers_are_told_to_stop_only_once_the_server_has_stopped_serving(service: ServiceRuntime) -> None:
    stop = threading.Event()
    server = Server([], workers=stop)
    stopped_by_sigterm(service, server, stop)
    assert server.stopped_with_workers_running and stop.is_set()


def test_sigint_stops_the_service_as_sigterm_does(service: ServiceRuntime) -> None:
    audit = service.security().audit
    stop = threading.Event()
    stopped_by_sigterm(service, Server([audit]), stop, signal.SIGINT)  # type: ignore[list-item]
    assert stop.is_set() and audit.closed_when == ["closed"]  # type: ignore[attr-defined]


def test_the_access_audit_gets_a_bounded_close_that_fits_the_time_bastion_down_grants(
        service: ServiceRuntime) -> None:
    audit = service.security().audit
    stopped_by_sigterm(service, Server([audit]), threading.Event())  # type: ignore[list-item]
    assert audit.timeouts == [ACCESS_AUDIT_CLOSE_SECONDS]  # type: ignore[attr-defined]
    grace = inspect.signature(ProcessSupervisor.stop).parameters["timeout"].default
    assert grace > 5 + 2 * ACCESS_AUDIT_CLOSE_SECONDS + WORKER_STOP_SECONDS, "server grace, audit and Kafka, workers"


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
SERVED = "bastion.accounts.v1.Accounts"  # a service name the server factory sets a status for


async def status_of(service: ServiceRuntime, name: str = "") -> int:
    """What a health check asking for NAME is told."""
    answer = await service.health_servicer.Check(health_pb2.HealthCheckRequest(service=name), None)
    return int(answer.status)


def statuses_said(service: ServiceRuntime, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The overall status the service's health check answers after each of its watchdog's rounds, as it changes."""
    said: list[int] = []
    refresh = service.health_servicer.refresh

    async def noted() -> list[str]:
        failing = await refresh()
        status = await status_of(service)
        if not said or said[-1] != status:
            said.append(status)
        return failing

    monkeypatch.setattr(service.health_servicer, "refresh", noted)
    return said


def test_the_health_check_says_not_serving_while_a_worker_keeps_failing_and_serving_once_it_recovers(
        service: ServiceRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_module, "HEALTH_CHECK_SECONDS", 0.01)
    said = statuses_said(service, monkeypatch)
    failing: list[list[str]] = [[], ["consumer"], ["consumer"], [], []]
    monkeypatch.setattr(service.workers, "failing", lambda _now: failing.pop(0) if failing else [])

    async def watch() -> None:
        await service.health_servicer.set("", SERVING)
        await service.health_servicer.set(SERVED, SERVING)
        watchdog = asyncio.create_task(service._report_workers())
        await asyncio.sleep(0.2)
        watchdog.cancel()
        assert await status_of(service, SERVED) == SERVING, "every status follows, not only the overall one"

    asyncio.run(watch())
    assert said == [NOT_SERVING, SERVING]


def test_the_health_check_says_not_serving_while_every_token_is_refused_for_want_of_revocations(
        service: ServiceRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    """A service that reads the token revocations refuses every token while they are unknown (not read, stale, the
    realm's watch silent): its health says so, and `bastion up` waits for it."""
    monkeypatch.setattr(runtime_module, "HEALTH_CHECK_SECONDS", 0.01)
    said = statuses_said(service, monkeypatch)
    revoked = service.revoked
    assert revoked.max_watch_silence_seconds == runtime_module.REVOCATIONS_WATCH_SILENCE_SECONDS
    service.reads_revocations = True  # as start_revocation_feed leaves it

    async def watch() -> None:
        await service.health_servicer.set("", SERVING)  # as the server factory does before it starts
        watchdog = asyncio.create_task(service._report_workers())
        await asyncio.sleep(0.1)
        assert said == [NOT_SERVING], "nothing read: every token refused"
        revoked.confirm_current(time.monotonic())
        revoked.watched(int(time.time() * 1000))
        await asyncio.sleep(0.1)
        watchdog.cancel()

    asyncio.run(watch())
    assert said == [NOT_SERVING, SERVING]


def test_a_server_that_starts_while_tokens_cannot_be_checked_says_not_serving_from_its_first_answer(
        service: ServiceRuntime) -> None:
    """The server factory sets SERVING for the server and each of its services before it starts listening: while
    every token would be refused (the feed gave up waiting at start), no health check is told SERVING meanwhile,
    not even before the watchdog's first round."""
    service.reads_revocations = True  # the feed not read yet

    async def start_then_recover() -> None:
        for name in ("", SERVED):
            await service.health_servicer.set(name, SERVING)
            assert await status_of(service, name) == NOT_SERVING
        service.revoked.confirm_current(time.monotonic())
        service.revoked.watched(int(time.time() * 1000))
        assert await service.health_servicer.refresh() == []
        for name in ("", SERVED):
            assert await status_of(service, name) == SERVING

    asyncio.run(start_then_recover())



def test_a_service_that_starts_not_serving_logs_what_fails(service: ServiceRuntime,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The health check answers NOT_SERVING from the start, and the watchdog's log says why: `health_changed` with
    what fails, as for a service that stops serving later, not nothing until it recovers."""
    monkeypatch.setattr(runtime_module, "HEALTH_CHECK_SECONDS", 0.01)
    service.reads_revocations = True  # nothing read yet: every token refused

    async def start_then_watch() -> None:
        await service.health_servicer.set("", SERVING)  # as the server factory does before it starts
        assert await status_of(service) == NOT_SERVING
        watchdog = asyncio.create_task(service._report_workers())
        await asyncio.sleep(0.1)
        watchdog.cancel()

    with capture_logs() as logs:
        asyncio.run(start_then_watch())
    changed = [line for line in logs if line["event"] == "health_changed"]
    assert [(line["serving"], line["failing_workers"]) for line in changed] == [(False, ["revocations"])]
