"""What every service process needs, built once at start-up from the dev install's state folder: its
certificate, signing key, database, Kafka and Redis clients, token validator, access audit and outbox relay.
A missing secret or key fails here, with a message that names it."""

import asyncio
import signal
import ssl
import threading
from dataclasses import dataclass
from typing import Any

import grpc
import redis.asyncio as aioredis
from sqlalchemy import Engine, create_engine

from bastion.devstack.components.kafka import Kafka
from bastion.devstack.components.keycloak import Keycloak
from bastion.devstack.components.postgres import Postgres
from bastion.devstack.context import StackContext
from bastion.devstack.errors import DevstackError
from bastion.devstack.stack import Stack
from bastion.events.keys import KeyRing, SigningKey
from bastion.events.outbox import Outbox, OutboxRelay
from bastion.grpc.audit import KafkaAccessAudit
from bastion.grpc.policy import load_method_policy
from bastion.grpc.ratelimit import RateLimit, RedisRateLimiter
from bastion.grpc.server import ServerSecurity, TlsFiles
from bastion.grpc.tokens import JwksCache, TokenValidator, jwks_url
from bastion.settings import DevstackSettings

DEFAULT_RATE_LIMIT = RateLimit(calls=600, window_seconds=60)


@dataclass
class ServiceRuntime:
    name: str
    ctx: StackContext
    engine: Engine
    key: SigningKey
    kafka_config: dict[str, Any]

    @classmethod
    def load(cls, name: str, settings: DevstackSettings) -> "ServiceRuntime":
        ctx = Stack(settings, progress=lambda message: None).context()
        if name not in ctx.credentials.postgres or name not in ctx.credentials.kafka:
            raise DevstackError(f"no secrets for service {name!r} in {ctx.layout.credentials_file}",
                                "run `bastion setup`; the service must be listed in infra/services.yaml")
        postgres = Postgres(ctx)
        engine = create_engine(postgres.sqlalchemy_url(name, ctx.credentials.postgres[name], name),
                               pool_size=10, max_overflow=10, pool_pre_ping=True)
        key = KeyRing(ctx.layout.event_keys_dir).signing_key(name)
        kafka_config = Kafka(ctx).client_config(name, ctx.credentials.kafka[name])
        return cls(name, ctx, engine, key, kafka_config)

    @property
    def grpc_port(self) -> int:
        port = next(s.grpc_port for s in self.ctx.services if s.name == self.name)
        return port + self.ctx.settings.service_port_offset

    def tls(self) -> TlsFiles:
        paths = self.ctx.pki.paths(self.name)
        return TlsFiles(paths.cert, paths.key, self.ctx.ca_file)

    def outbox(self) -> Outbox:
        return Outbox(self.key)

    def start_relay(self, stop: threading.Event) -> threading.Thread:
        relay = OutboxRelay(self.engine, self.kafka_config, self.key)
        thread = threading.Thread(target=relay.run, args=(stop,), name=f"{self.name}-outbox-relay", daemon=True)
        thread.start()
        return thread

    async def serve_until_stopped(self, server: grpc.aio.Server, port: int, relay: threading.Event) -> None:
        """Log where the service listens, then serve until SIGTERM or SIGINT; stop the relay last."""
        print(f"{self.name} serving on {self.ctx.settings.bind_host}:{port}", flush=True)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await stopping.wait()
        await server.stop(5)
        relay.set()

    def security(self, rate_limit: RateLimit = DEFAULT_RATE_LIMIT) -> ServerSecurity:
        issuer = Keycloak(self.ctx).issuer
        jwks = JwksCache.from_url(jwks_url(issuer), ssl.create_default_context(cafile=str(self.ctx.ca_file)))
        jwks.start_background_refresh()
        redis = aioredis.Redis(host=self.ctx.settings.bind_host, port=self.ctx.settings.redis_port,
                               username=self.name, password=self.ctx.credentials.redis[self.name])
        return ServerSecurity(
            service=self.name,
            tls=self.tls(),
            validator=TokenValidator(issuer, self.name, jwks),
            policy=load_method_policy(self.ctx.settings.infra_dir / "policies" / f"{self.name}.yaml"),
            audit=KafkaAccessAudit(self.key, self.kafka_config),
            limiter=RedisRateLimiter(redis, self.name, rate_limit),
        )
