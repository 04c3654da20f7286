"""The client a service calls another one with (`Downstream`): its client-credentials token fetched once and renewed
before it expires, the caller's correlation id and the end user's token passed on, a refused service token
forgotten, and every answer turned into the kit's own errors: only UNAVAILABLE and DEADLINE_EXCEEDED retried, only
an unhealthy downstream opening the breaker, a business refusal passed on as it came."""

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from keycloak.exceptions import KeycloakConnectionError

from bastion.devstack.pki import DevPki
from bastion.grpc.channels import call_metadata, secure_channel
from bastion.grpc.client import END_USER_TOKEN_HEADER, Downstream, ServiceTokens, is_unhealthy
from bastion.grpc.context import CORRELATION_HEADER, CallContext, current_call
from bastion.grpc.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RequestError,
    ResourceExhaustedError,
    UnavailableError,
)
from bastion.grpc.server import MAX_MESSAGE_BYTES, TlsFiles, server_credentials
from bastion.grpc.tokens import Principal
from bastion.resilience.breaker import memory_breaker
from bastion.resilience.retry import RetryBudget
from bastion.testing.tokens import ManualClock

ALICE = Principal(
    subject="u-1",
    username="alice",
    client_id="bastion-cli",
    roles=frozenset({"customer"}),
    token_id="t-1",
    expires_at=0,
)
PAYMENTS = Principal(
    subject="u-2",
    username="service-account-payments",
    client_id="payments",
    roles=frozenset(),
    token_id="t-2",
    expires_at=0,
)


class FakeKeycloak:
    """Keycloak's token endpoint for client credentials: numbered tokens living EXPIRES_IN seconds (no lifetime at
    all if None); each grant takes TAKES seconds of CLOCK; unreachable while FAILING."""

    def __init__(self, clock: ManualClock, expires_in: int | None = 300, takes: float = 0.0) -> None:
        self.clock = clock
        self.expires_in = expires_in
        self.takes = takes
        self.failing = False
        self.grants: list[str] = []

    def token(self, grant_type: str, **_options: Any) -> dict[str, Any]:
        if self.failing:
            raise KeycloakConnectionError("Can't connect to server")
        self.grants.append(grant_type)
        self.clock.advance(self.takes)
        answer: dict[str, Any] = {"access_token": f"token-{len(self.grants)}", "token_type": "Bearer"}
        if self.expires_in is not None:
            answer["expires_in"] = self.expires_in
        return answer


def service_tokens(**options: Any) -> tuple[ServiceTokens, FakeKeycloak, ManualClock]:
    clock = ManualClock()
    keycloak = FakeKeycloak(clock, **options)
    return ServiceTokens(keycloak, clock=clock), keycloak, clock  # type: ignore[arg-type]


def test_the_service_token_is_fetched_once_and_renewed_at_four_fifths_of_its_lifetime() -> None:
    tokens, keycloak, clock = service_tokens(expires_in=300)
    start = clock.now
    assert asyncio.run(tokens.token()) == "token-1"
    clock.now = start + 239.9
    assert asyncio.run(tokens.token()) == "token-1"
    assert keycloak.grants == ["client_credentials"], "asked once, with the client-credentials grant"
    clock.now = start + 240  # 60 s before it expires: renewed, never sent about to expire
    assert asyncio.run(tokens.token()) == "token-2"
    clock.now = start + 479.9
    assert asyncio.run(tokens.token()) == "token-2"
    assert len(keycloak.grants) == 2


def test_a_tokens_lifetime_counts_from_when_it_was_asked_for_not_from_when_the_answer_came() -> None:
    tokens, _, clock = service_tokens(expires_in=300, takes=30)  # Keycloak answered after 30 s
    start = clock.now
    assert asyncio.run(tokens.token()) == "token-1"
    clock.now = start + 240
    assert asyncio.run(tokens.token()) == "token-2"


def test_a_token_that_states_no_lifetime_is_renewed_within_a_minute() -> None:
    tokens, _, clock = service_tokens(expires_in=None)
    start = clock.now
    assert asyncio.run(tokens.token()) == "token-1"
    clock.now = start + 47.9
    assert asyncio.run(tokens.token()) == "token-1"
    clock.now = start + 48
    assert asyncio.run(tokens.token()) == "token-2"


def test_calls_that_all_need_a_token_at_once_share_one_grant() -> None:
    tokens, keycloak, _ = service_tokens()

    async def many() -> list[str]:
        return list(await asyncio.gather(*(tokens.token() for _ in range(5))))

    assert asyncio.run(many()) == ["token-1"] * 5
    assert len(keycloak.grants) == 1


def test_keycloak_unreachable_is_unavailable_and_the_next_call_asks_again() -> None:
    tokens, keycloak, _ = service_tokens()
    keycloak.failing = True
    with pytest.raises(UnavailableError, match="no service token: Keycloak could not be reached"):
        asyncio.run(tokens.token())
    keycloak.failing = False
    assert asyncio.run(tokens.token()) == "token-1"


class FakeMethod:
    """A downstream's stub method: gives ANSWERS in turn (a status code is raised as gRPC raises it, "hang" never
    answers), and notes each call's metadata and timeout."""

    def __init__(self, *answers: str | grpc.StatusCode, details: str = "") -> None:
        self.answers = list(answers)
        self.details = details
        self.calls: list[tuple[dict[str, str], float | None]] = []

    async def __call__(
        self, request: Any, metadata: tuple[tuple[str, str], ...] = (), timeout: float | None = None
    ) -> str:
        self.calls.append((dict(metadata), timeout))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if answer == "hang":
            await asyncio.sleep(60)
        if isinstance(answer, grpc.StatusCode):
            raise grpc.aio.AioRpcError(answer, grpc.aio.Metadata(), grpc.aio.Metadata(), details=self.details)
        return answer


def accounts(deadline_seconds: float = 5.0, fail_max: int = 2,
             pass_end_user_token: bool = False) -> tuple[Downstream, FakeKeycloak]:
    """Accounts as payments sees it: a fresh breaker (open after FAIL_MAX unhealthy calls), a full retry budget;
    sent the end user's token only if PASS_END_USER_TOKEN (payments does not)."""
    clock = ManualClock()
    keycloak = FakeKeycloak(clock)
    downstream = Downstream(
        "accounts",
        None,
        ServiceTokens(keycloak, clock=clock),  # type: ignore[arg-type]
        memory_breaker("payments->accounts", is_failure=is_unhealthy, fail_max=fail_max),
        RetryBudget(),
        deadline_seconds=deadline_seconds,
        pass_end_user_token=pass_end_user_token,
    )
    return downstream, keycloak


def called(downstream: Downstream, method: FakeMethod, call: CallContext | None = None) -> str:
    """Call METHOD through DOWNSTREAM, on behalf of CALL when given (as a handler does while serving it)."""

    async def run() -> str:
        if call is not None:
            current_call.set(call)  # this task's own context: gone when it ends
        return await downstream.call(method, "request")

    return asyncio.run(run())


def test_a_call_on_a_users_behalf_sends_the_service_token_the_correlation_id_and_the_users_token() -> None:
    downstream, _ = accounts(deadline_seconds=5.0, pass_end_user_token=True)
    method = FakeMethod("reply")
    served = CallContext("corr-7", "cli", ALICE, "/bastion.payments.v1.Payments/Transfer", bearer="alices-token")
    assert called(downstream, method, served) == "reply"
    [(metadata, timeout)] = method.calls
    assert metadata["authorization"] == "Bearer token-1"
    assert metadata[CORRELATION_HEADER] == "corr-7"
    assert metadata[END_USER_TOKEN_HEADER] == "alices-token"
    assert timeout is not None and 0 < timeout <= 5.0


def test_the_end_users_token_goes_only_to_a_downstream_declared_to_read_it() -> None:
    # A downstream holding the user's token could replay it at this service, as the user, until it expires.
    downstream, _ = accounts()
    method = FakeMethod("reply")
    served = CallContext("corr-6", "cli", ALICE, "/bastion.payments.v1.Payments/Transfer", bearer="alices-token")
    called(downstream, method, served)
    [(metadata, _)] = method.calls
    assert END_USER_TOKEN_HEADER not in metadata and "alices-token" not in str(metadata)
    assert metadata[CORRELATION_HEADER] == "corr-6", "the rest of the call's context still goes"
    undeclared = Downstream("accounts", None, None, None, None)  # type: ignore[arg-type]
    assert not undeclared.pass_end_user_token, "not passed unless declared"


def test_a_service_accounts_own_token_is_never_passed_on_as_an_end_users() -> None:
    downstream, _ = accounts(pass_end_user_token=True)  # even to a downstream that reads end users' tokens
    method = FakeMethod("reply")
    served = CallContext("corr-8", "payments", PAYMENTS, "/bastion.accounts.v1.Accounts/Debit", bearer="svc-token")
    called(downstream, method, served)
    without_bearer = CallContext("corr-9", "cli", ALICE, "/bastion.payments.v1.Payments/Transfer")
    called(downstream, method, without_bearer)
    assert [END_USER_TOKEN_HEADER in metadata for metadata, _ in method.calls] == [False, False]
    assert [metadata[CORRELATION_HEADER] for metadata, _ in method.calls] == ["corr-8", "corr-9"]


def test_a_retry_gets_only_what_is_left_of_the_deadline() -> None:
    downstream, _ = accounts(deadline_seconds=5.0)
    method = FakeMethod(grpc.StatusCode.UNAVAILABLE, "reply")
    assert called(downstream, method) == "reply"
    [(_, first), (_, second)] = method.calls
    assert first is not None and second is not None and second < first <= 5.0


@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN])
def test_a_failing_downstream_is_not_asked_twice_but_opens_the_breaker(code: grpc.StatusCode) -> None:
    """INTERNAL may have done the work before it failed: asked again, a transfer could run twice. It still says
    the downstream is unhealthy: after FAIL_MAX of them the breaker answers at once, without calling."""
    downstream, _ = accounts(fail_max=2)
    method = FakeMethod(code)
    for _ in range(2):
        with pytest.raises(UnavailableError, match=f"accounts failed: {code.name}"):
            called(downstream, method)
    assert len(method.calls) == 2
    with pytest.raises(UnavailableError, match=r"accounts is unavailable \(circuit open\)"):
        called(downstream, method)
    assert len(method.calls) == 2


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
        (grpc.StatusCode.NOT_FOUND, NotFoundError),
        (grpc.StatusCode.FAILED_PRECONDITION, FailedPreconditionError),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDeniedError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhaustedError),
    ],
)
def test_a_business_refusal_is_passed_on_as_it_came_and_never_opens_the_breaker(
    code: grpc.StatusCode, error: type[RequestError]
) -> None:
    downstream, _ = accounts(fail_max=2)
    method = FakeMethod(code, details="account a1: insufficient funds")
    for _ in range(3):
        with pytest.raises(error) as refused:
            called(downstream, method)
        assert type(refused.value) is error and str(refused.value) == "account a1: insufficient funds"
    assert len(method.calls) == 3, "each asked once, and the breaker stayed closed"


def test_a_downstream_that_does_not_answer_within_the_deadline_is_unavailable() -> None:
    downstream, _ = accounts(deadline_seconds=0.2)
    started = time.monotonic()
    with pytest.raises(UnavailableError, match=r"accounts did not answer within 0\.2s"):
        called(downstream, FakeMethod("hang"))
    assert time.monotonic() - started < 1.5


class HangingKeycloak(FakeKeycloak):
    """Keycloak's token endpoint when it takes connections and never answers (until RELEASED, or 2 s)."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(clock)
        self.released = threading.Event()
        self.asked = 0

    def token(self, grant_type: str, **options: Any) -> dict[str, Any]:
        self.asked += 1
        self.released.wait(2.0)
        raise KeycloakConnectionError("Read timed out")


def test_a_service_token_keycloak_does_not_hand_over_is_waited_for_only_within_the_deadline() -> None:
    """A Keycloak that does not answer holds the call no longer than its deadline (python-keycloak waits 60 s), and
    calls that gave up waiting leave the one request in flight to the next instead of each asking again."""
    downstream, _ = accounts(deadline_seconds=0.2)
    keycloak = HangingKeycloak(ManualClock())
    downstream.tokens = ServiceTokens(keycloak)  # type: ignore[arg-type]
    method = FakeMethod("reply")

    async def two_calls() -> None:
        try:
            for _ in range(2):
                started = time.monotonic()
                with pytest.raises(UnavailableError, match=r"no service token to call accounts within 0\.2s"):
                    await downstream.call(method, "request")
                assert time.monotonic() - started < 1.0
        finally:
            keycloak.released.set()

    asyncio.run(two_calls())
    assert method.calls == [] and keycloak.asked == 1


def test_a_refused_service_token_is_replaced_and_the_call_made_once_more_with_the_fresh_one() -> None:
    """A downstream's interceptor refused the token before any handler ran (revoked, say): the caller sees nothing."""
    downstream, keycloak = accounts()
    method = FakeMethod(grpc.StatusCode.UNAUTHENTICATED, "reply")
    assert called(downstream, method) == "reply"
    assert [metadata["authorization"] for metadata, _ in method.calls] == ["Bearer token-1", "Bearer token-2"]
    assert len(keycloak.grants) == 2
    assert called(downstream, method) == "reply" and len(keycloak.grants) == 2  # the fresh one is kept


def test_a_fresh_token_refused_too_is_unavailable_after_one_more_call_not_a_loop() -> None:
    downstream, keycloak = accounts()
    method = FakeMethod(grpc.StatusCode.UNAUTHENTICATED)
    with pytest.raises(UnavailableError, match="accounts refused this service's credentials"):
        called(downstream, method)
    assert [metadata["authorization"] for metadata, _ in method.calls] == ["Bearer token-1", "Bearer token-2"]
    called_again = pytest.raises(UnavailableError)
    with called_again:
        called(downstream, method)
    assert len(keycloak.grants) == 4, "each call starts from a fresh token: the refused one is not kept"


@pytest.mark.parametrize("code", list(grpc.StatusCode))
def test_only_unavailable_timeouts_and_internal_failures_count_against_a_downstream(code: grpc.StatusCode) -> None:
    error = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="from a test")
    unhealthy = {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
    assert is_unhealthy(error) == (code in unhealthy)
    assert not is_unhealthy(RuntimeError("not a gRPC error"))


def test_call_metadata_sends_the_token_as_a_bearer_token_and_the_correlation_id() -> None:
    assert call_metadata("eyJ.a.b", "corr-1") == (("authorization", "Bearer eyJ.a.b"), ("x-correlation-id", "corr-1"))
    assert call_metadata(None) == ()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    pki = DevPki(tmp_path_factory.mktemp("pki"), leaf_days=1, reissue_when_days_left=0)
    pki.ensure(["cli", "accounts"])
    return pki


def tls(pki: DevPki, name: str) -> TlsFiles:
    paths = pki.paths(name)
    return TlsFiles(paths.cert, paths.key, Path(pki.ca_file))


def test_the_kits_channel_neither_sends_nor_takes_a_message_over_1_mib(pki: DevPki) -> None:
    """A server that echoes whatever it gets, with no limits of its own: the 1 MiB limit is the channel's."""
    handled: list[int] = []

    async def echo(request: bytes, _context: Any) -> bytes:
        handled.append(len(request))
        return request if len(request) > 1 else b"\x00" * (MAX_MESSAGE_BYTES + 1)

    async def scenario() -> tuple[grpc.StatusCode, grpc.StatusCode]:
        server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),)
        )
        port = server.add_secure_port("127.0.0.1:0", server_credentials(tls(pki, "accounts")))
        await server.start()
        channel = secure_channel(f"localhost:{port}", tls(pki, "cli"), "accounts")
        call = channel.unary_unary("/test.Echo/Echo")
        try:
            assert await call(b"ok", timeout=10) == b"ok"
            codes = []
            for request in (b"\x00" * (MAX_MESSAGE_BYTES + 1), b"?"):  # too large to send; a reply too large to take
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call(request, timeout=10)
                codes.append(refused.value.code())
            return codes[0], codes[1]
        finally:
            await channel.close()
            await server.stop(0)

    assert asyncio.run(scenario()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert handled == [2, 1], "the request too large to send never reached the server"
