"""The server factory (bastion/grpc/server.py) on loopback, with a throw-away dev CA, fake realm keys and the Probe
servicer: a caller needs a dev-CA certificate and a token, the security interceptor admits every call, a message
over 1 MiB is refused unread, health answers, and reflection is served in the dev profile only
(tests/integration/test_grpc_kit.py runs the same server against the test stack)."""

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from bastion.access.v1.decision_pb2 import DECISION_ALLOW
from bastion.accounts.v1 import accounts_pb2
from bastion.devstack.errors import DevstackError
from bastion.devstack.pki import DevPki
from bastion.grpc.audit import MemoryAccessAudit
from bastion.grpc.channels import call_metadata, secure_channel
from bastion.grpc.errors import ResourceExhaustedError
from bastion.grpc.policy import load_method_policy
from bastion.grpc.server import ServerSecurity, TlsFiles, start_server
from bastion.grpc.tokens import JwksCache, TokenValidator
from bastion.probe.v1 import probe_pb2, probe_pb2_grpc
from bastion.settings import PROJECT_ROOT
from bastion.testing.probe import ProbeServicer
from bastion.testing.tokens import REALM_ISSUER, FakeJwksEndpoint, TokenMinter

SERVICE = "accounts"  # the probe answers as the accounts service: tokens must name it in `aud`
PROBE = probe_pb2.DESCRIPTOR.services_by_name["Probe"]
WHOAMI = "/bastion.probe.v1.Probe/Whoami"
MINTER = TokenMinter(audience=SERVICE)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    pki = DevPki(tmp_path_factory.mktemp("pki"), leaf_days=1, reissue_when_days_left=0)
    pki.ensure(["cli", SERVICE])
    return pki


def tls(pki: DevPki, name: str) -> TlsFiles:
    paths = pki.paths(name)
    return TlsFiles(paths.cert, paths.key, Path(pki.ca_file))


class ExhaustedLimiter:
    async def admit(self, _principal_key: str, _service_account: bool = False) -> None:
        raise ResourceExhaustedError("rate limit of 1 calls per 60s exceeded")


def security(pki: DevPki, audit: MemoryAccessAudit, limiter: Any = None) -> ServerSecurity:
    validator = TokenValidator(REALM_ISSUER, SERVICE, JwksCache(FakeJwksEndpoint(MINTER)))
    policy = load_method_policy(PROJECT_ROOT / "infra" / "policies" / "probe.yaml")
    return ServerSecurity(SERVICE, tls(pki, SERVICE), validator, policy, audit, limiter)


@asynccontextmanager
async def probe_server(pki: DevPki, audit: MemoryAccessAudit | None = None, limiter: Any = None,
                       **options: Any) -> AsyncIterator[int]:
    """A Probe server started by the factory, on a free loopback port (yielded), stopped after."""
    server, port = await start_server(security(pki, audit or MemoryAccessAudit(), limiter),
                                      lambda s: probe_pb2_grpc.add_ProbeServicer_to_server(ProbeServicer(), s),
                                      [PROBE], **options)
    try:
        yield port
    finally:
        await server.stop(0)


def run(scenario: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return asyncio.run(scenario())


async def code_of(call: Any, *args: Any, **kwargs: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(*args, timeout=10, **kwargs)
    return refused.value.code()


def test_a_caller_with_a_dev_ca_certificate_and_a_token_is_served_and_the_call_audited(pki: DevPki) -> None:
    audit = MemoryAccessAudit()

    async def scenario() -> str:
        async with probe_server(pki, audit) as port, secure_channel(f"localhost:{port}", tls(pki, "cli"),
                                                                    SERVICE) as channel:
            reply = await probe_pb2_grpc.ProbeStub(channel).Whoami(
                probe_pb2.WhoamiRequest(), metadata=call_metadata(MINTER.mint()), timeout=10)
            return str(reply.username)

    assert run(scenario) == "alice"
    assert [(decision.method, decision.decision) for decision in audit.decisions] == [(WHOAMI, DECISION_ALLOW)]


def test_a_caller_without_a_client_certificate_never_reaches_a_handler(pki: DevPki) -> None:
    audit = MemoryAccessAudit()
    server_only = grpc.ssl_channel_credentials(root_certificates=Path(pki.ca_file).read_bytes())

    async def scenario() -> list[grpc.StatusCode]:
        async with probe_server(pki, audit) as port, grpc.aio.secure_channel(f"localhost:{port}",
                                                                             server_only) as channel:
            return [await code_of(probe_pb2_grpc.ProbeStub(channel).Whoami, probe_pb2.WhoamiRequest(),
                                  metadata=call_metadata(MINTER.mint())),
                    await code_of(health_pb2_grpc.HealthStub(channel).Check, health_pb2.HealthCheckRequest())]

    assert run(scenario) == [grpc.StatusCode.UNAVAILABLE] * 2
    assert audit.decisions == [], "refused in the TLS handshake, before the interceptor"


def test_a_plaintext_caller_gets_no_answer(pki: DevPki) -> None:
    async def scenario() -> grpc.StatusCode:
        async with probe_server(pki) as port, grpc.aio.insecure_channel(f"localhost:{port}") as channel:
            return await code_of(health_pb2_grpc.HealthStub(channel).Check, health_pb2.HealthCheckRequest())

    assert run(scenario) == grpc.StatusCode.UNAVAILABLE


def test_every_call_goes_through_the_security_interceptor_and_its_rate_limiter(pki: DevPki) -> None:
    async def scenario(limiter: Any) -> grpc.StatusCode:
        async with probe_server(pki, limiter=limiter) as port, secure_channel(f"localhost:{port}",
                                                                              tls(pki, "cli"), SERVICE) as channel:
            whoami = probe_pb2_grpc.ProbeStub(channel).Whoami
            assert await code_of(whoami, probe_pb2.WhoamiRequest()) == grpc.StatusCode.UNAUTHENTICATED
            return await code_of(whoami, probe_pb2.WhoamiRequest(), metadata=call_metadata(MINTER.mint()))

    assert run(lambda: scenario(ExhaustedLimiter())) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_request_over_1_mib_is_refused_before_any_handler(pki: DevPki) -> None:
    audit = MemoryAccessAudit()

    async def scenario() -> grpc.StatusCode:
        async with probe_server(pki, audit) as port:
            cli = tls(pki, "cli")
            credentials = grpc.ssl_channel_credentials(cli.ca.read_bytes(), cli.key.read_bytes(), cli.cert.read_bytes())
            async with grpc.aio.secure_channel(f"localhost:{port}", credentials,
                                               options=[("grpc.max_send_message_length", -1)]) as channel:
                return await code_of(channel.unary_unary(WHOAMI), b"\x00" * ((1 << 20) + 1),
                                     metadata=call_metadata(MINTER.mint()))

    assert run(scenario) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert audit.decisions == []


def test_a_service_whose_methods_the_policy_does_not_cover_is_not_served(pki: DevPki) -> None:
    accounts = accounts_pb2.DESCRIPTOR.services_by_name["Accounts"]

    async def scenario() -> None:
        server, _ = await start_server(security(pki, MemoryAccessAudit()), lambda _server: None, [PROBE, accounts])
        await server.stop(0)  # reached only if the server started: the test fails

    with pytest.raises(DevstackError, match="method policy of bastion\\.accounts\\.v1\\.Accounts"):
        run(scenario)


def test_health_answers_serving_for_the_server_and_each_service_and_follows_the_servicer_passed_in(
        pki: DevPki) -> None:
    servicer = health.aio.HealthServicer()

    async def scenario() -> list[int]:
        async with probe_server(pki, health_servicer=servicer) as port, secure_channel(
                f"localhost:{port}", tls(pki, "cli"), SERVICE) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            said = [(await check(health_pb2.HealthCheckRequest(service=name), timeout=10)).status
                    for name in ("", PROBE.full_name)]
            await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # as a failing worker makes it
            return [*said, (await check(health_pb2.HealthCheckRequest(), timeout=10)).status]

    assert run(scenario) == [health_pb2.HealthCheckResponse.SERVING] * 2 + [health_pb2.HealthCheckResponse.NOT_SERVING]


@pytest.mark.parametrize(("options", "listed"), [
    ({}, None),
    ({"dev_profile": False}, None),
    ({"dev_profile": True}, [PROBE.full_name, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"]),
])
def test_reflection_is_served_in_the_dev_profile_only(pki: DevPki, options: dict[str, bool],
                                                      listed: list[str] | None) -> None:
    async def scenario() -> list[str] | grpc.StatusCode:
        async with probe_server(pki, **options) as port, secure_channel(f"localhost:{port}",
                                                                        tls(pki, "cli"), SERVICE) as channel:
            ask = reflection_pb2.ServerReflectionRequest(list_services="")
            try:
                async for answer in reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                        iter([ask]), timeout=10):
                    return sorted(service.name for service in answer.list_services_response.service)
            except grpc.aio.AioRpcError as refused:
                return refused.code()
            raise AssertionError("no answer")

    assert run(scenario) == (sorted(listed) if listed else grpc.StatusCode.UNIMPLEMENTED)


def test_the_server_listens_on_loopback_unless_told_otherwise(pki: DevPki) -> None:
    async def scenario() -> set[str]:
        async with probe_server(pki) as port:
            return {connection.laddr.ip for connection in psutil.Process().net_connections("inet")
                    if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port}

    addresses = {ipaddress.ip_address(address) for address in run(scenario)}
    assert {getattr(address, "ipv4_mapped", None) or address for address in addresses} == {
        ipaddress.ip_address("127.0.0.1")}
