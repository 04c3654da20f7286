"""The client factory against a real downstream: retries within the budget, a breaker shared through Redis
that opens, fails fast and closes again, and UNAVAILABLE at once while it is open."""

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest
from keycloak import KeycloakOpenID

from bastion.devstack.components.redis import Redis
from bastion.devstack.context import StackContext
from bastion.grpc.audit import MemoryAccessAudit
from bastion.grpc.channels import secure_channel
from bastion.grpc.client import Downstream, ServiceTokens, is_unhealthy
from bastion.grpc.errors import UnavailableError
from bastion.probe.v1 import probe_pb2, probe_pb2_grpc
from bastion.resilience.breaker import redis_breaker
from bastion.resilience.retry import RetryBudget
from bastion.testing.probe import FlakyProbeServicer
from tests.integration.grpc_harness import SERVICE, ProbeServer, start_probe, tls_of

FAIL_MAX, RESET_SECONDS = 3, 3.0


@pytest.fixture()
def flaky(ctx: StackContext) -> Iterator[tuple[ProbeServer, FlakyProbeServicer]]:
    servicer = FlakyProbeServicer()
    server = start_probe(ctx, MemoryAccessAudit(), servicer=servicer)
    yield server, servicer
    server.stop()


def downstream(ctx: StackContext, redis_server: Redis, port: int, budget: RetryBudget) -> Downstream:
    tokens = ServiceTokens(KeycloakOpenID(
        server_url=f"https://localhost:{ctx.settings.keycloak_port}/", realm_name="bastion", client_id="payments",
        client_secret_key=ctx.credentials.keycloak_clients["payments"], verify=str(ctx.ca_file)))
    breaker = redis_breaker("payments", f"probe-{uuid.uuid4().hex[:8]}",
                            redis_server.client("payments", ctx.credentials.redis["payments"]),
                            is_failure=is_unhealthy, fail_max=FAIL_MAX, reset_timeout=RESET_SECONDS)
    channel = secure_channel(f"localhost:{port}", tls_of(ctx, "payments"), SERVICE)
    return Downstream("probe", channel, tokens, breaker, budget, deadline_seconds=3.0)


async def outcomes(target: Downstream, calls: int) -> list[tuple[str, float]]:
    stub = probe_pb2_grpc.ProbeStub(target.channel)
    results = []
    for _ in range(calls):
        started = time.monotonic()
        try:
            await target.call(stub.PaymentsOnly, probe_pb2.PaymentsOnlyRequest())
            results.append(("ok", time.monotonic() - started))
        except UnavailableError as error:
            results.append((str(error), time.monotonic() - started))
    return results


def test_breaker_opens_fails_fast_and_closes_and_retries_stay_within_budget(
    ctx: StackContext, redis_server: Redis, flaky: tuple[ProbeServer, FlakyProbeServicer]
) -> None:
    server, servicer = flaky
    budget = RetryBudget(ratio=0.2, cap=2.0)

    async def scenario() -> None:
        target = downstream(ctx, redis_server, server.port, budget)
        assert (await outcomes(target, 1))[0][0] == "ok"
        servicer.failing, servicer.calls = True, 0
        failing = await outcomes(target, 30)
        assert all(result != "ok" for result, _ in failing)
        # the downstream saw at most the failures that open the breaker plus the budget's retries
        assert servicer.calls <= FAIL_MAX + budget.cap + 1, servicer.calls
        open_results = [(r, t) for r, t in failing if "circuit open" in r]
        assert len(open_results) >= 25
        assert max(t for _, t in open_results) < 0.25, "an open breaker answers at once"
        servicer.failing = False
        await asyncio.sleep(RESET_SECONDS + 1.0)
        recovered = await outcomes(target, 5)
        assert [r for r, _ in recovered] == ["ok"] * 5
        await target.channel.close()

    asyncio.run(scenario())


def test_downstream_stopped_then_restarted(ctx: StackContext, redis_server: Redis) -> None:
    servicer = FlakyProbeServicer()
    server = start_probe(ctx, MemoryAccessAudit(), servicer=servicer)
    port = server.port

    async def scenario() -> None:
        nonlocal server
        target = downstream(ctx, redis_server, port, RetryBudget(ratio=0.2, cap=2.0))
        assert (await outcomes(target, 1))[0][0] == "ok"
        server.stop()
        down = await outcomes(target, 10)
        assert all(r != "ok" for r, _ in down)
        assert any("circuit open" in r for r, _ in down[FAIL_MAX:])
        server = start_probe(ctx, MemoryAccessAudit(), servicer=servicer, port=port)
        await asyncio.sleep(RESET_SECONDS + 1.0)
        assert [r for r, _ in await outcomes(target, 3)] == ["ok"] * 3
        await target.channel.close()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
