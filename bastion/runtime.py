"""What every service process needs, built once at start-up from the dev install's state folder: its
certificate, signing key, database, Kafka and Redis clients, token validator, access audit and outbox relay.
A missing secret or key fails here, with a message that names it."""

import asyncio
import signal
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

import grpc
import redis.asyncio as aioredis
import structlog
from sqlalchemy import Engine, create_engine

from bastion.devstack.components.kafka import Kafka
from bastion.devstack.components.keycloak import Keycloak
from bastion.devstack.components.postgres import Postgres
from bastion.devstack.context import StackContext
from bastion.devstack.errors import DevstackError
from bastion.devstack.event_access import load_policy
from bastion.devstack.stack import Stack
from bastion.events.consumer import ConsumerSettings, Handler, VerifyingConsumer, rejection_recorder
from bastion.events.field_crypto import DataKeyRing
from bastion.events.keys import Followed, FollowedSigningKey, KeyRing, TrustStore
from bastion.events.outbox import Outbox, OutboxRelay
from bastion.events.trust import load_trust_policy
from bastion.events.verify import EnvelopeVerifier
from bastion.grpc.audit import KafkaAccessAudit
from bastion.grpc.otlp import otlp_exporter
from bastion.grpc.policy import load_method_policy
from bastion.grpc.ratelimit import RateLimit, RedisRateLimiter
from bastion.grpc.server import ServerSecurity, TlsFiles
from bastion.grpc.spans import SpanRecorder, jsonl_exporter
from bastion.grpc.tokens import JwksCache, TokenValidator, jwks_url
from bastion.metrics_endpoint import serve_metrics
from bastion.revocations.feed import TOPIC as REVOCATIONS_TOPIC
from bastion.revocations.feed import RevocationFeed
from bastion.revocations.revoked import RevokedTokens
from bastion.service_health import ServiceHealth
from bastion.settings import DevstackSettings
from bastion.worker_health import WorkerHealth

log = structlog.get_logger(__name__)
DEFAULT_RATE_LIMIT = RateLimit(calls=600, window_seconds=60)
SERVICE_ACCOUNT_RATE_LIMIT = RateLimit(calls=30_000, window_seconds=60)
WORKER_RESTART_SECONDS = 2.0
HEALTH_CHECK_SECONDS = 2.0
WORKER_STOP_SECONDS = 10.0
ACCESS_AUDIT_CLOSE_SECONDS = 5.0  # for the worker, and as long again for Kafka
TOKEN_LEEWAY_SECONDS = 30  # the validator's leeway on `exp`, `iat` and `nbf` (clock skew)
# Token revocations (bastion/revocations): read and kept for as long as a token they end can still be accepted, and
# trusted for this long after the feed was last known read to its end; then every token is refused (fail closed).
REVOCATIONS_STALE_SECONDS = 30.0
# ... and trusted for this long after the realm's watch (the audit service) last said it published every change: the
# watch says so every 5 s, and a minute lets the audit service or Keycloak restart without shutting every door.
REVOCATIONS_WATCH_SILENCE_SECONDS = 60.0
REVOCATIONS_FIRST_READ_SECONDS = 20.0  # how long a starting service waits for the feed before it serves anyway


class Worker(Protocol):
    def run(self, stop: threading.Event) -> None: ...
    def close(self) -> None: ...


def revoked_tokens(ctx: StackContext) -> RevokedTokens:
    """An empty set of revoked tokens with the limits every service checks by: kept as long as the realm's tokens
    can be accepted, refused when the feed or the watch has been silent too long."""
    lifespan = Keycloak(ctx).access_token_lifespan_seconds
    return RevokedTokens(keep_seconds=lifespan + 2 * TOKEN_LEEWAY_SECONDS,
                         max_staleness_seconds=REVOCATIONS_STALE_SECONDS,
                         max_watch_silence_seconds=REVOCATIONS_WATCH_SILENCE_SECONDS)


@dataclass
class ServiceRuntime:
    name: str
    ctx: StackContext
    engine: Engine
    key: FollowedSigningKey  # the service's signing key as the key ring says now (rotations need no restart)
    kafka_config: dict[str, Any]
    workers: WorkerHealth = field(default_factory=WorkerHealth)
    threads: list[threading.Thread] = field(default_factory=list)
    # Never SERVING while a worker keeps failing or tokens cannot be checked (`_failing`), from the server's start.
    health_servicer: ServiceHealth = field(init=False)
    # The tokens this service refuses although they verify: read from identity.revocations.v1 by the feed
    # (`start_revocation_feed`), checked by the validator on every call. Made here, before any worker thread
    # could ask for it, so every reader holds the same set.
    revoked: RevokedTokens = field(init=False)
    # The publisher of the service's access decisions, once `security()` made it: closed when the service stops.
    access_audit: KafkaAccessAudit | None = None
    reads_revocations: bool = False  # once `start_revocation_feed` ran: the health check then also says whether
    # tokens can be checked (NOT_SERVING while every token is refused as "token revocations unavailable")

    def __post_init__(self) -> None:
        self.health_servicer = ServiceHealth(self._failing)
        self.revoked = revoked_tokens(self.ctx)

    @classmethod
    def load(cls, name: str, settings: DevstackSettings) -> "ServiceRuntime":
        ctx = Stack(settings, progress=lambda message: None).context()
        if name not in ctx.credentials.postgres or name not in ctx.credentials.kafka:
            raise DevstackError(f"no secrets for service {name!r} in {ctx.layout.credentials_file}",
                                "run `bastion setup`; the service must be listed in infra/services.yaml")
        postgres = Postgres(ctx)
        engine = create_engine(postgres.sqlalchemy_url(name, ctx.credentials.postgres[name], name),
                               pool_size=10, max_overflow=10, pool_pre_ping=True)
        key = KeyRing(ctx.layout.event_keys_dir).followed_signing_key(name)
        kafka_config = Kafka(ctx).client_config(name, ctx.credentials.kafka[name])
        return cls(name, ctx, engine, key, kafka_config)

    @property
    def grpc_port(self) -> int:
        return self.ctx.grpc_port(self.name)

    @property
    def metrics_port(self) -> int:
        return self.ctx.metrics_port(self.name)

    @cached_property
    def spans(self) -> SpanRecorder:
        """The recorder of this service's sampled calls and of its relaying and processing of the events they
        cause, writing logs/NAME.spans.jsonl (bastion/grpc/spans.py)."""
        path = self.ctx.layout.log_dir / f"{self.name}.spans.jsonl"
        recorder = SpanRecorder(self.name, jsonl_exporter(path), self.ctx.settings.trace_sample_ratio,
                                per_second=self.ctx.settings.trace_spans_per_second)
        if self.ctx.settings.trace_otlp_endpoint:
            recorder.export_also(otlp_exporter(self.ctx.settings.trace_otlp_endpoint, self.tls()), "otlp")
        return recorder

    def tls(self) -> TlsFiles:
        paths = self.ctx.pki.paths(self.name)
        return TlsFiles(paths.cert, paths.key, self.ctx.ca_file)

    def outbox(self) -> Outbox:
        return Outbox(self.key)

    def data_keys(self) -> DataKeyRing:
        """The per-topic data keys this service is entitled to (infra/personal-data.yaml), copied at setup."""
        return DataKeyRing(self.ctx.layout.data_keys_dir / self.name)

    def verifier(self) -> EnvelopeVerifier:
        """The consumer pipeline's checks, from the trust store and infra/event-trust.yaml; the trust store is
        followed, so a producer's rotated key is believed and a retired one refused without a restart."""
        infra = self.ctx.settings.infra_dir
        access = load_policy(infra / "event-access.yaml", set(self.ctx.service_names))
        return EnvelopeVerifier(self.trust(), load_trust_policy(infra / "event-trust.yaml", access))

    def trust(self) -> Followed[TrustStore]:
        """The producers' public keys as the key ring says now."""
        return KeyRing(self.ctx.layout.event_keys_dir).followed_trust_store()

    def start_consumer(self, topics: list[str], handler: Handler, stop: threading.Event) -> threading.Thread:
        """Consume TOPICS through the verifying consumer (group = the service's name) until STOP is set."""
        settings = ConsumerSettings(self.name, self.name, topics,
                                    gap_alert_seconds=self.ctx.settings.sequence_gap_alert_seconds)
        return self.start_worker("consumer", lambda: VerifyingConsumer(
            settings, self.kafka_config, self.verifier(), self.engine, handler, security_outbox=self.outbox(),
            spans=self.spans), stop)

    def start_worker(self, role: str, build: Callable[[], Worker], stop: threading.Event) -> threading.Thread:
        """Run a worker built by BUILD in a thread until STOP is set. After a failure (database or Kafka away) a
        new one is built: consumers resume from their last committed offsets, and whatever they read again
        is harmless (inbox, or a log keyed by Kafka coordinates)."""

        def run() -> None:
            while not stop.is_set():
                worker: Worker | None = None
                try:
                    worker = build()
                    self.workers.started(role, time.monotonic())
                    worker.run(stop)
                except Exception as error:
                    self.workers.failed(role, time.monotonic())
                    log.error("worker_failed", service=self.name, role=role, error=type(error).__name__,
                              detail=str(error))
                    time.sleep(WORKER_RESTART_SECONDS)
                finally:
                    if worker is not None:
                        try:
                            worker.close()
                        except Exception as error:  # closing a broken client must not end the restart loop
                            log.warning("worker_close_failed", service=self.name, role=role,
                                        error=type(error).__name__)

        thread = threading.Thread(target=run, name=f"{self.name}-{role}", daemon=True)
        thread.start()
        self.threads.append(thread)
        return thread

    def start_relay(self, stop: threading.Event) -> threading.Thread:
        """Publish the outbox until STOP is set, restarted after a failure like any worker (and reported by
        the health check if it keeps failing). The events of recorded calls leave their span of publishing."""
        return self.start_worker("outbox-relay", lambda: OutboxRelay(self.engine, self.kafka_config, self.key,
                                                                     spans=self.spans), stop)

    async def serve_until_stopped(self, server: grpc.aio.Server, port: int, stop: threading.Event) -> None:
        """Log where the service listens, then serve until SIGTERM or SIGINT; stop the workers last. Meanwhile the
        health check says NOT_SERVING while a background worker keeps failing (see bastion.worker_health)."""
        metrics = serve_metrics(self.ctx.settings.bind_host, self.metrics_port, self.tls())
        log.info("service_serving", address=f"{self.ctx.settings.bind_host}:{port}", metrics=metrics.url)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        watchdog = asyncio.create_task(self._report_workers())
        await stopping.wait()
        watchdog.cancel()
        await server.stop(5)
        # The workers wind down while the audit publishes what is left (both bounded; `bastion down` waits 30 s
        # before SIGKILL): one after the other they could take 5 + 20 + 10 s with Kafka unreachable.
        stop.set()
        if self.access_audit is not None:
            # No call is served any more: publish the decisions still queued or in librdkafka's hands (those it
            # cannot deliver are counted and logged as lost), not leave them to die with the process.
            try:
                await asyncio.to_thread(self.access_audit.close, ACCESS_AUDIT_CLOSE_SECONDS)
            except Exception as error:  # the rest of the shutdown must still run
                log.error("access_audit_close_failed", service=self.name, error=type(error).__name__)
        # Let the workers end their loop and close: a consumer that closes leaves its group at once, so its
        # partitions go to the other members (or this service's next start) now, not after the session timeout.
        deadline = time.monotonic() + WORKER_STOP_SECONDS
        for thread in self.threads:
            await asyncio.to_thread(thread.join, max(deadline - time.monotonic(), 0.1))
        await asyncio.to_thread(self.spans.shutdown)  # the spans still batched
        await asyncio.to_thread(metrics.close)  # last: counters stay readable while the workers wind down

    async def _report_workers(self) -> None:
        # What the log last said, not what the server's start answered: nothing logged yet reads as serving, so a
        # service that starts NOT_SERVING logs at the first round what fails, as one that stops serving later does.
        serving = True
        while True:
            await asyncio.sleep(HEALTH_CHECK_SECONDS)
            failing = await self.health_servicer.refresh()
            if (not failing) != serving:
                serving = not failing
                log.warning("health_changed", service=self.name, serving=serving, failing_workers=failing)

    def _failing(self) -> list[str]:
        """What keeps the service from serving, by name: workers that keep failing, and "revocations" while every
        token is refused for want of them."""
        failing = self.workers.failing(time.monotonic())
        if self.reads_revocations and not self.revoked.is_current():
            failing.append("revocations")
        return failing

    def start_revocation_feed(self, stop: threading.Event) -> threading.Thread:
        """Read the token revocations into `revoked` until STOP is set, under the group infra/event-access.yaml
        grants this service as a witness of the topic; wait (at most REVOCATIONS_FIRST_READ_SECONDS) until they were
        read to their end once and the realm's watch was heard from. Until then, whenever the feed falls behind, and
        while the watch is silent, tokens are refused (UNAVAILABLE) and the health check says NOT_SERVING."""
        access = load_policy(self.ctx.settings.infra_dir / "event-access.yaml", set(self.ctx.service_names))
        group = access.topics[REVOCATIONS_TOPIC].witnesses.get(self.name)
        if group is None:
            raise DevstackError(f"infra/event-access.yaml grants {self.name!r} no witness group on {REVOCATIONS_TOPIC}",
                                "every service that validates tokens reads the revocations: add it there")
        revoked = self.revoked
        self.reads_revocations = True
        refusals = rejection_recorder(self.engine, self.outbox(), self.name)  # published by the outbox relay
        thread = self.start_worker("revocations", lambda: RevocationFeed(
            self.name, self.kafka_config, group, self.verifier(), revoked, revoked.keep_seconds,
            record_refusals=refusals), stop)
        deadline = time.monotonic() + REVOCATIONS_FIRST_READ_SECONDS
        while not revoked.is_current() and time.monotonic() < deadline and not stop.is_set():
            time.sleep(0.1)
        if not revoked.is_current():
            log.warning("revocations_not_read_yet", service=self.name,
                        waited_seconds=REVOCATIONS_FIRST_READ_SECONDS)
        return thread

    def security(self, rate_limit: RateLimit = DEFAULT_RATE_LIMIT) -> ServerSecurity:
        issuer = Keycloak(self.ctx).issuer
        jwks = JwksCache.from_url(jwks_url(issuer), ssl.create_default_context(cafile=str(self.ctx.ca_file)))
        jwks.start_background_refresh()
        redis = aioredis.Redis(**self.ctx.redis_options(self.name, self.ctx.credentials.redis[self.name]))
        self.access_audit = KafkaAccessAudit(self.key, self.kafka_config)
        return ServerSecurity(
            service=self.name,
            tls=self.tls(),
            validator=TokenValidator(issuer, self.name, jwks, leeway_seconds=TOKEN_LEEWAY_SECONDS,
                                     revocations=self.revoked),
            policy=load_method_policy(self.ctx.settings.infra_dir / "policies" / f"{self.name}.yaml"),
            audit=self.access_audit,
            limiter=RedisRateLimiter(redis, self.name, rate_limit, SERVICE_ACCOUNT_RATE_LIMIT),
            spans=self.spans,
        )
