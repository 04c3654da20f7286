"""A Probe server on a free port, in a thread with its own event loop, wired with the real kit against the
test stack: Keycloak's JWKS, the dev CA, Redis for rate limits, Kafka for access decisions."""

import asyncio
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import redis.asyncio as aioredis
from keycloak import KeycloakOpenID

from bastion.devstack.components.keycloak import Keycloak
from bastion.devstack.context import StackContext
from bastion.grpc.audit import AccessAudit, KafkaAccessAudit
from bastion.grpc.policy import MethodPolicy, load_method_policy
from bastion.grpc.ratelimit import RateLimit, RedisRateLimiter
from bastion.grpc.server import ServerSecurity, TlsFiles, start_server
from bastion.grpc.spans import SpanRecorder
from bastion.grpc.tokens import JwksCache, TokenValidator, jwks_url
from bastion.probe.v1 import probe_pb2, probe_pb2_grpc
from bastion.settings import PROJECT_ROOT
from bastion.testing.probe import ProbeServicer

SERVICE = "accounts"  # the probe answers as the accounts service: tokens must name it in `aud`


def probe_policy() -> MethodPolicy:
    return load_method_policy(PROJECT_ROOT / "infra" / "policies" / "probe.yaml")


def tls_of(ctx: StackContext, name: str) -> TlsFiles:
    paths = ctx.pki.paths(name)
    return TlsFiles(paths.cert, paths.key, ctx.ca_file)


@dataclass
class ProbeServer:
    port: int
    loop: asyncio.AbstractEventLoop
    server: grpc.aio.Server
    thread: threading.Thread
    extras: dict[str, Any] = field(default_factory=dict)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def start_probe(ctx: StackContext, audit: AccessAudit, rate_limit: RateLimit | None = None,
                clock_skew: float = 0.0, servicer: ProbeServicer | None = None, port: int = 0,
                spans: SpanRecorder | None = None) -> ProbeServer:
    keycloak = Keycloak(ctx)
    jwks = JwksCache.from_url(jwks_url(keycloak.issuer), ssl.create_default_context(cafile=str(ctx.ca_file)))
    jwks.start_background_refresh()
    validator = TokenValidator(keycloak.issuer, SERVICE, jwks, clock=lambda: time.time() + clock_skew)
    loop = asyncio.new_event_loop()
    ready: dict[str, Any] = {}

    async def boot() -> None:
        limiter = None
        if rate_limit is not None:
            client = aioredis.Redis(**ctx.redis_options(SERVICE, ctx.credentials.redis[SERVICE]))
            limiter = RedisRateLimiter(client, SERVICE, rate_limit)
        security = ServerSecurity(SERVICE, tls_of(ctx, SERVICE), validator, probe_policy(), audit, limiter, spans)
        server, bound = await start_server(
            security, lambda s: probe_pb2_grpc.add_ProbeServicer_to_server(servicer or ProbeServicer(), s),
            [probe_pb2.DESCRIPTOR.services_by_name["Probe"]], port=port, dev_profile=True,
        )
        ready.update(server=server, port=bound)

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(boot())
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while "port" not in ready and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "port" in ready, "the probe server did not start"
    return ProbeServer(ready["port"], loop, ready["server"], thread)


def kafka_audit(ctx: StackContext, key: Any) -> KafkaAccessAudit:
    from bastion.devstack.components.kafka import Kafka

    return KafkaAccessAudit(key, Kafka(ctx).client_config(SERVICE, ctx.credentials.kafka[SERVICE]))


def user_token(ctx: StackContext, user: str) -> dict[str, Any]:
    client = KeycloakOpenID(server_url=f"https://localhost:{ctx.settings.keycloak_port}/", realm_name="bastion",
                            client_id="bastion-cli", verify=str(ctx.ca_file))
    token: dict[str, Any] = client.token(user, ctx.credentials.users[user])
    return token


def service_token(ctx: StackContext, service: str) -> str:
    client = KeycloakOpenID(server_url=f"https://localhost:{ctx.settings.keycloak_port}/", realm_name="bastion",
                            client_id=service, client_secret_key=ctx.credentials.keycloak_clients[service],
                            verify=str(ctx.ca_file))
    token: str = client.token(grant_type="client_credentials")["access_token"]
    return token
