"""The payments service process: wires settings, the kit and the adapters, then serves until stopped.

Run by the devstack as `python -m services.payments.server`; settings come from the BASTION_* environment.
"""

import asyncio
import datetime as dt
import threading

import redis
import redis.asyncio as aioredis
import structlog
from keycloak import KeycloakOpenID

from bastion import service_logs
from bastion.devstack.components.keycloak import Keycloak
from bastion.grpc.channels import secure_channel
from bastion.grpc.client import Downstream, ServiceTokens, is_unhealthy
from bastion.grpc.server import start_server
from bastion.payments.v1 import payments_pb2, payments_pb2_grpc
from bastion.resilience.breaker import redis_breaker
from bastion.resilience.retry import RetryBudget
from bastion.runtime import ServiceRuntime
from bastion.settings import DevstackSettings
from services.payments.adapters.gateways import GrpcAccounts, KeycloakIntrospection, redis_locks
from services.payments.adapters.grpc import PaymentsServicer
from services.payments.adapters.postgres import PostgresUnitOfWork, create_schema
from services.payments.domain import Limits
from services.payments.handlers import AccountsGateway, PaymentsHandlers
from services.payments.settings import PaymentsSettings

log = structlog.get_logger(__name__)
NAME = "payments"


def accounts_downstream(runtime: ServiceRuntime, own: PaymentsSettings) -> Downstream:
    ctx = runtime.ctx
    keycloak = Keycloak(ctx)
    tokens = ServiceTokens.for_service(keycloak.server_url, keycloak.realm_name, NAME,
                                       ctx.credentials.keycloak_clients[NAME], str(ctx.ca_file))
    breaker_redis = redis.Redis(**ctx.redis_options(NAME, ctx.credentials.redis[NAME]))
    breaker = redis_breaker(NAME, "accounts", breaker_redis, is_failure=is_unhealthy,
                            fail_max=own.breaker_fail_max, reset_timeout=own.breaker_reset_seconds)
    channel = secure_channel(ctx.grpc_address("accounts"), runtime.tls(), "accounts")
    return Downstream("accounts", channel, tokens, breaker, RetryBudget(), own.accounts_deadline_seconds,
                      spans=runtime.spans)


def build_handlers(runtime: ServiceRuntime, own: PaymentsSettings, accounts: AccountsGateway) -> PaymentsHandlers:
    ctx = runtime.ctx
    lock_redis = aioredis.Redis(**ctx.redis_options(NAME, ctx.credentials.redis[NAME]))
    keycloak = Keycloak(ctx)
    introspection = KeycloakIntrospection(KeycloakOpenID(
        server_url=keycloak.server_url, realm_name=keycloak.realm_name, client_id=NAME,
        client_secret_key=ctx.credentials.keycloak_clients[NAME], verify=str(ctx.ca_file)))
    limits = Limits(own.daily_limit_minor, own.velocity_count, dt.timedelta(seconds=own.velocity_window_seconds),
                    own.step_up_above_minor)
    return PaymentsHandlers(PostgresUnitOfWork(runtime.engine, runtime.outbox()), accounts,
                            redis_locks(lock_redis, own.lock_ttl_seconds), introspection, limits)


async def settle_pending_forever(handlers: PaymentsHandlers, own: PaymentsSettings) -> None:
    """The reconciler: every interval, settle the payments left PENDING for longer than the grace period."""
    while True:
        await asyncio.sleep(own.reconcile_every_seconds)
        try:
            settled = await handlers.settle_pending(dt.timedelta(seconds=own.pending_grace_seconds))
        except Exception as error:  # the database may be away for a while: try again next round
            log.warning("reconciler_failed", error=type(error).__name__, detail=str(error))
            continue
        for payment in settled:
            log.info("pending_payment_settled", payment_id=payment.payment_id, status=payment.status.value)


async def serve(settings: DevstackSettings, own: PaymentsSettings) -> None:
    runtime = ServiceRuntime.load(NAME, settings)
    create_schema(runtime.engine)
    handlers = build_handlers(runtime, own, GrpcAccounts(accounts_downstream(runtime, own)))
    stop = threading.Event()
    runtime.start_revocation_feed(stop)  # before serving: tokens are refused until it was read
    runtime.start_relay(stop)
    reconciler = asyncio.create_task(settle_pending_forever(handlers, own))
    server, port = await start_server(
        runtime.security(),
        lambda s: payments_pb2_grpc.add_PaymentsServicer_to_server(  # type: ignore[no-untyped-call]
            PaymentsServicer(handlers), s),
        [payments_pb2.DESCRIPTOR.services_by_name["Payments"]],
        port=runtime.grpc_port, host=settings.bind_host, dev_profile=settings.dev_profile,
        health_servicer=runtime.health_servicer,
    )
    await runtime.serve_until_stopped(server, port, stop)
    reconciler.cancel()


def main() -> None:
    service_logs.configure(NAME)
    asyncio.run(serve(DevstackSettings(), PaymentsSettings()))


if __name__ == "__main__":
    main()
