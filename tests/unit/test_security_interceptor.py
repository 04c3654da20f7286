"""The security interceptor without a network: a call's metadata and peer certificate in, the refusal (status and
audited decision) or the handler's reply out (tests/integration/test_grpc_kit.py runs it on a real server)."""

import asyncio
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from structlog.testing import capture_logs

from bastion.access.v1.decision_pb2 import DECISION_ALLOW, DECISION_DENY
from bastion.grpc.audit import MemoryAccessAudit
from bastion.grpc.context import SAN_PROPERTY
from bastion.grpc.errors import ResourceExhaustedError
from bastion.grpc.interceptor import SecurityInterceptor
from bastion.grpc.policy import Decision, load_method_policy
from bastion.grpc.tokens import JwksCache, TokenValidator
from bastion.revocations.revoked import RevokedTokens
from bastion.testing.tokens import REALM_ISSUER, FakeJwksEndpoint, ManualClock, TokenMinter

SERVICE = "accounts"
POLICY = Path(__file__).resolve().parents[2] / "infra" / "policies" / "probe.yaml"
WHOAMI = "/bastion.probe.v1.Probe/Whoami"
COUNTDOWN = "/bastion.probe.v1.Probe/Countdown"


class Refused(Exception):
    """What the fake context's `abort` raises, as grpc.aio's raises AbortError."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code, self.details = code, details


class FakeContext:
    """A ServicerContext for a peer whose certificate carries IDENTITIES (SANs)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...], identities: list[bytes]) -> None:
        self.metadata = metadata
        self.identities = identities

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def set_trailing_metadata(self, _metadata: Any) -> None:
        pass

    def peer_identity_key(self) -> str | None:
        return SAN_PROPERTY if self.identities else None

    def peer_identities(self) -> list[bytes] | None:
        return self.identities or None

    def code(self) -> None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Refused(code, details)


@dataclass
class Details:
    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


@dataclass
class Kit:
    clock: ManualClock
    minter: TokenMinter
    endpoint: FakeJwksEndpoint
    audit: MemoryAccessAudit
    interceptor: SecurityInterceptor
    handled: list[str]

    def call(self, method: str, authorization: str | None, peer: str = "cli", served: bool = True) -> Any:
        """Call METHOD through the interceptor; the handler's reply, or Refused."""
        metadata = (("authorization", authorization),) if authorization is not None else ()
        identities = [b"localhost", f"spiffe://bastion.local/service/{peer}".encode()]

        async def handler(_request: Any, _context: Any) -> str:
            self.handled.append(method)
            return "reply"

        async def continuation(_details: Any) -> Any:
            return grpc.unary_unary_rpc_method_handler(handler) if served else None

        async def run() -> Any:
            wrapped = await self.interceptor.intercept_service(continuation, Details(method, metadata))
            assert wrapped is not None, "the interceptor answers every path it does not leave to the transport"
            return await wrapped.unary_unary(b"", FakeContext(metadata, identities))

        return asyncio.run(run())

    def refused(self, method: str, authorization: str | None, **kwargs: Any) -> Refused:
        with pytest.raises(Refused) as caught:
            self.call(method, authorization, **kwargs)
        assert method not in self.handled, "a refused call never reaches its handler"
        return caught.value


@pytest.fixture()
def kit() -> Kit:
    clock = ManualClock()
    minter = TokenMinter(audience=SERVICE, clock=clock)
    endpoint = FakeJwksEndpoint(minter)
    validator = TokenValidator(REALM_ISSUER, SERVICE, JwksCache(endpoint, clock=clock), clock=clock)
    audit = MemoryAccessAudit()
    interceptor = SecurityInterceptor(SERVICE, validator, load_method_policy(POLICY), audit)
    return Kit(clock, minter, endpoint, audit, interceptor, [])


def test_a_valid_bearer_token_over_a_bastion_certificate_reaches_the_handler(kit: Kit) -> None:
    assert kit.call(WHOAMI, f"Bearer {kit.minter.mint()}") == "reply"
    assert kit.call(WHOAMI, f"bearer {kit.minter.mint()}") == "reply"  # the scheme is case-insensitive
    assert [decision.decision for decision in kit.audit.decisions] == [DECISION_ALLOW, DECISION_ALLOW]


@pytest.mark.parametrize("scheme", ["Basic", "Token", "DPoP", ""])
def test_a_valid_token_under_another_scheme_is_unauthenticated(kit: Kit, scheme: str) -> None:
    refusal = kit.refused(WHOAMI, f"{scheme} {kit.minter.mint()}".strip())
    assert refusal.code == grpc.StatusCode.UNAUTHENTICATED and "missing bearer token" in refusal.details
    assert [(d.decision, d.method) for d in kit.audit.decisions] == [(DECISION_DENY, WHOAMI)]


def test_token_keys_that_cannot_be_fetched_answer_unavailable_not_unauthenticated(kit: Kit) -> None:
    """Keycloak unreachable says nothing about the caller's token: the caller may retry, and must not drop it."""
    kit.endpoint.failing = True
    refusal = kit.refused(WHOAMI, f"Bearer {kit.minter.mint()}")
    assert refusal.code == grpc.StatusCode.UNAVAILABLE and "token keys unavailable" in refusal.details


def test_a_revoked_token_is_unauthenticated_and_unknown_revocations_answer_unavailable(kit: Kit) -> None:
    """A token issued before its access was revoked is no token; revocations that cannot be read say nothing about
    the caller's token, so the call is refused UNAVAILABLE (fail closed), to be retried."""
    revoked = RevokedTokens(keep_seconds=360, max_staleness_seconds=30, max_watch_silence_seconds=60)
    kit.interceptor.validator._revocations = revoked
    token = kit.minter.mint()
    refusal = kit.refused(WHOAMI, f"Bearer {token}")
    assert refusal.code == grpc.StatusCode.UNAVAILABLE
    assert "token revocations unavailable" in refusal.details and "not been read yet" in refusal.details
    revoked.confirm_current(time.monotonic())
    revoked.watched(int(time.time() * 1000) - 61_000)  # the watch last heard from a minute ago: nobody can tell
    refusal = kit.refused(WHOAMI, f"Bearer {token}")
    assert refusal.code == grpc.StatusCode.UNAVAILABLE
    assert "the realm's watch (the audit service) was last heard from 61 s ago" in refusal.details
    revoked.watched(int(time.time() * 1000))
    assert kit.call(WHOAMI, f"Bearer {token}") == "reply"
    revoked.revoke(kit.minter.claims()["sub"], int(time.time() * 1000) + 10**7)
    kit.handled.clear()
    refusal = kit.refused(WHOAMI, f"Bearer {token}")
    assert refusal.code == grpc.StatusCode.UNAUTHENTICATED and "access was revoked" in refusal.details
    assert [d.decision for d in kit.audit.decisions] == [DECISION_DENY, DECISION_DENY, DECISION_ALLOW, DECISION_DENY]


class StreamContext(FakeContext):
    """A FakeContext whose `abort` raises grpc.aio's AbortError, as a real one does, and keeps the status."""

    def __init__(self, metadata: tuple[tuple[str, str], ...], identities: list[bytes]) -> None:
        super().__init__(metadata, identities)
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def code(self) -> Any:
        return self.aborted[0] if self.aborted is not None else None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise grpc.aio.AbortError()


def test_a_stream_sends_nothing_more_once_its_session_has_ended(kit: Kit) -> None:
    """A stream is admitted once and may stay open for the token's whole life: signed out (or revoked) meanwhile, it
    must not go on sending what the token no longer entitles anybody to."""
    clock = ManualClock(float(kit.minter.claims()["iat"]))
    revoked = RevokedTokens(keep_seconds=360, max_staleness_seconds=30, max_watch_silence_seconds=60, clock=clock)
    revoked.confirm_current(time.monotonic())
    revoked.watched(int(clock() * 1000))
    kit.interceptor.validator._revocations = revoked
    metadata = (("authorization", f"Bearer {kit.minter.mint(sid='session-1')}"),)
    context = StreamContext(metadata, [b"spiffe://bastion.local/service/cli"])
    sent: list[int] = []

    async def countdown(_request: Any, _context: Any) -> Any:
        for value in (3, 2, 1):
            if value == 2:
                revoked.revoke(None, int(clock() * 1000), session="session-1")  # the user signs out
            yield value

    async def continuation(_details: Any) -> Any:
        return grpc.unary_stream_rpc_method_handler(countdown)

    async def run() -> None:
        wrapped = await kit.interceptor.intercept_service(continuation, Details(COUNTDOWN, metadata))
        async for value in wrapped.unary_stream(b"", context):
            sent.append(value)

    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(run())
    assert sent == [3]
    assert context.aborted is not None and context.aborted[0] == grpc.StatusCode.UNAUTHENTICATED
    assert "the session this token was issued in has ended" in context.aborted[1]
    assert [d.decision for d in kit.audit.decisions] == [DECISION_ALLOW, DECISION_DENY]


class FaultyValidator:
    """A validator with a fault: a token no rule foresaw makes it raise something else than AuthenticationError."""

    def validate(self, token: str, may_fetch: bool = True) -> Any:
        raise OverflowError("cannot convert float infinity to integer")


def test_a_keycloak_that_hangs_while_a_new_key_is_fetched_stalls_no_other_call(kit: Kit) -> None:
    """A token under a key the server has not seen makes it fetch the realm's keys: from a worker thread, so the
    calls of known tokens go on meanwhile, and the waiting call is admitted once the keys came."""
    known = f"Bearer {kit.minter.mint()}"
    assert kit.call(WHOAMI, known) == "reply"  # the keys are fetched and the token remembered
    kit.clock.advance(31)  # past the gap between two fetches
    kit.minter.rotate()
    rotated = f"Bearer {kit.minter.mint()}"
    kit.endpoint.answering = answering = threading.Event()
    identities = [b"spiffe://bastion.local/service/cli"]

    async def call(authorization: str) -> Any:
        metadata = (("authorization", authorization),)

        async def handler(_request: Any, _context: Any) -> str:
            return authorization

        async def continuation(_details: Any) -> Any:
            return grpc.unary_unary_rpc_method_handler(handler)

        wrapped = await kit.interceptor.intercept_service(continuation, Details(WHOAMI, metadata))
        return await wrapped.unary_unary(b"", FakeContext(metadata, identities))

    async def run() -> None:
        waiting = asyncio.create_task(call(rotated))
        await asyncio.sleep(0.05)
        assert kit.endpoint.fetches == 2 and not waiting.done(), "Keycloak asked, and not answering"
        served = await asyncio.wait_for(asyncio.gather(*(call(known) for _ in range(3))), timeout=2)
        assert served == [known] * 3, "served from the cache while the fetch hangs"
        also_rotated = asyncio.create_task(call(rotated))  # another call under the new key meanwhile: it waits too
        await asyncio.sleep(0.05)
        assert not also_rotated.done() and kit.endpoint.fetches == 2
        answering.set()
        assert await asyncio.wait_for(asyncio.gather(waiting, also_rotated), timeout=5) == [rotated, rotated]

    asyncio.run(run())


def test_a_fault_in_the_token_check_refuses_the_call_unauthenticated_audited_and_logged(kit: Kit) -> None:
    kit.interceptor.validator = FaultyValidator()  # type: ignore[assignment]
    with capture_logs() as logs:
        refusal = kit.refused(WHOAMI, f"Bearer {kit.minter.mint()}")
    assert refusal.code == grpc.StatusCode.UNAUTHENTICATED
    assert refusal.details == "invalid token: it could not be checked", "the exception's text is not the caller's"
    assert [(d.decision, d.method) for d in kit.audit.decisions] == [(DECISION_DENY, WHOAMI)]
    assert {"token_check_failed", "call_refused"} <= {line["event"] for line in logs}
    fault = next(line for line in logs if line["event"] == "token_check_failed")
    refused = next(line for line in logs if line["event"] == "call_refused")
    assert fault["error"] == "OverflowError" and fault["correlation_id"] == refused["correlation_id"]


@pytest.mark.parametrize("path", ["/evil.Service/grpc.health.v1.Health/Check", "/x/grpc.reflection.v1/Info"])
def test_an_unserved_path_merely_containing_a_transport_prefix_is_refused_and_audited(kit: Kit, path: str) -> None:
    refusal = kit.refused(path, f"Bearer {kit.minter.mint()}", served=False)
    assert refusal.code == grpc.StatusCode.PERMISSION_DENIED
    assert [(d.decision, d.method) for d in kit.audit.decisions] == [(DECISION_DENY, path)]


def test_a_certificate_without_a_bastion_identity_is_unauthenticated_whatever_the_token(kit: Kit) -> None:
    refusal = kit.refused(WHOAMI, f"Bearer {kit.minter.mint()}", peer="Not A Name")
    assert refusal.code == grpc.StatusCode.UNAUTHENTICATED and "no Bastion identity" in refusal.details


def test_a_forged_token_is_unauthenticated_not_treated_as_anonymous(kit: Kit) -> None:
    forged = kit.minter.edited_payload(kit.minter.mint(), realm_access={"roles": ["teller"]})
    refusal = kit.refused("/bastion.probe.v1.Probe/TellerOnly", f"Bearer {forged}")
    assert refusal.code == grpc.StatusCode.UNAUTHENTICATED and forged not in refusal.details


def test_the_policy_verdict_refuses_a_valid_caller_without_the_role(kit: Kit) -> None:
    refusal = kit.refused("/bastion.probe.v1.Probe/TellerOnly", f"Bearer {kit.minter.mint()}")
    assert refusal.code == grpc.StatusCode.PERMISSION_DENIED


class ExhaustedLimiter:
    def __init__(self) -> None:
        self.asked: list[tuple[str, bool]] = []

    async def admit(self, principal_key: str, service_account: bool = False) -> None:
        self.asked.append((principal_key, service_account))
        raise ResourceExhaustedError("rate limit of 1 calls per 60s exceeded")


def test_a_limiter_refusal_refuses_the_call_for_that_user(kit: Kit) -> None:
    limiter = ExhaustedLimiter()
    kit.interceptor.limiter = limiter  # type: ignore[assignment]
    refusal = kit.refused(WHOAMI, f"Bearer {kit.minter.mint()}")
    assert refusal.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert limiter.asked == [(f"bastion-cli:{kit.minter.claims()['sub']}", False)]


def test_an_unserved_path_is_refused_even_if_the_policy_were_to_allow_it(kit: Kit) -> None:
    """Fail closed: a path gRPC routes to no handler ends refused, whatever the policy says of it."""
    class AllowsAnything:
        def decide(self, *_args: Any) -> Decision:
            return Decision(True, "allowed by a broken policy")

    kit.interceptor.policy = AllowsAnything()  # type: ignore[assignment]
    refusal = kit.refused(WHOAMI + "/", f"Bearer {kit.minter.mint()}", served=False)
    assert refusal.code is grpc.StatusCode.UNIMPLEMENTED and "no method" in refusal.details
