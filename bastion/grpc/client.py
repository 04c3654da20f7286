"""The client factory: calls to another service over mutual TLS, with a client-credentials token, the end
user's token, the correlation id and the trace context passed on, retries on transient failures within a
deadline and a budget, and a circuit breaker per downstream. An open breaker answers UNAVAILABLE at once.

A call made on behalf of a recorded call (its trace sampled: bastion/grpc/spans.py) is recorded too, as a CLIENT
span from its start to its outcome, retries, backoff and an open breaker included; the downstream's own span is
that span's child."""

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from keycloak import KeycloakOpenID

from bastion.grpc.context import CORRELATION_HEADER, current_call
from bastion.grpc.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RequestError,
    ResourceExhaustedError,
    UnavailableError,
)
from bastion.grpc.spans import SpanRecorder
from bastion.grpc.trace import TraceContext
from bastion.resilience.breaker import AsyncCircuitBreaker, BreakerOpenError
from bastion.resilience.retry import DeadlineExceededError, RetryBudget, resilient_call

T = TypeVar("T")
END_USER_TOKEN_HEADER = "x-end-user-token"  # noqa: S105 - a header name, not a secret
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# What says the downstream is unhealthy (opens the breaker); a business refusal does not.
UNHEALTHY = TRANSIENT | {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
PASSED_ON: dict[grpc.StatusCode, type[RequestError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
}


def _code(error: Exception) -> grpc.StatusCode | None:
    return error.code() if isinstance(error, grpc.aio.AioRpcError) else None


def is_transient(error: Exception) -> bool:
    return _code(error) in TRANSIENT


def is_unhealthy(error: Exception) -> bool:
    return _code(error) in UNHEALTHY


def path_of(method: Any) -> str:
    """The `/SERVICE/METHOD` path of a grpc.aio stub method, which keeps the path it was made for (as bytes); ""
    for anything else."""
    path = getattr(method, "_method", b"")
    return path.decode("ascii", errors="replace") if isinstance(path, bytes) else ""


class _TokenRefusedError(Exception):
    """The downstream refused this service's token (UNAUTHENTICATED): its interceptor did, before any handler."""


class ServiceTokens:
    """This service's client-credentials access token, fetched from Keycloak and renewed before it expires."""

    def __init__(self, client: KeycloakOpenID, renew_fraction: float = 0.8,
                 clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.renew_fraction = renew_fraction
        self.clock = clock
        self._token = ""
        self._renew_at = 0.0
        self._fetching: asyncio.Future[str] | None = None

    @classmethod
    def for_service(cls, keycloak_url: str, realm: str, service: str, secret: str, ca_file: str) -> "ServiceTokens":
        return cls(KeycloakOpenID(server_url=keycloak_url, realm_name=realm, client_id=service,
                                  client_secret_key=secret, verify=ca_file))

    def forget(self) -> None:
        self._token, self._renew_at = "", 0.0

    async def token(self) -> str:
        if self._token and self.clock() < self._renew_at:
            return self._token
        # One grant in flight, shared and shielded: a caller that stops waiting (its deadline) leaves it to the
        # others, so a Keycloak that does not answer holds one request and one thread, not one per caller in turn.
        if self._fetching is None:
            self._fetching = asyncio.ensure_future(self._fetch())
            self._fetching.add_done_callback(_retrieved)
        return await asyncio.shield(self._fetching)

    async def _fetch(self) -> str:
        try:
            issued_at = self.clock()
            try:
                answer = await asyncio.to_thread(self.client.token, grant_type="client_credentials")
            except Exception as error:  # any failure to get a token means: cannot call
                raise UnavailableError("no service token: Keycloak could not be reached") from error
            self._token = str(answer["access_token"])
            self._renew_at = issued_at + float(answer.get("expires_in", 60)) * self.renew_fraction
            return self._token
        finally:
            self._fetching = None


def _retrieved(fetch: "asyncio.Future[str]") -> None:
    """Take a grant's failure even when every caller stopped waiting for it, so asyncio does not report it lost."""
    if not fetch.cancelled():
        fetch.exception()


@dataclass
class _Attempts:
    """How many attempts one call made (retries included), for its span."""

    made: int = 0


@dataclass
class Downstream:
    """One downstream service as seen by a caller: its breaker, retry budget and deadline, the recorder of the
    calls made on behalf of recorded calls (SPANS; none records nothing), and whether the end user's token goes
    with each call (PASS_END_USER_TOKEN: only to a downstream that reads it, see `metadata`)."""

    name: str
    channel: grpc.aio.Channel
    tokens: ServiceTokens
    breaker: AsyncCircuitBreaker
    budget: RetryBudget
    deadline_seconds: float = 5.0
    spans: SpanRecorder | None = None  # records the calls made on behalf of recorded calls
    pass_end_user_token: bool = False

    def metadata(self, service_token: str, trace: TraceContext | None = None) -> tuple[tuple[str, str], ...]:
        """The metadata of a call made on behalf of the call being served, if any: this service's token, the
        correlation id, the trace context (TRACE, or else the served call's span as the parent) and, to a
        downstream declared to read it, the end user's token.

        The end user's token is for this service (its audience): a downstream that holds it can replay it here
        until it expires, acting as that user. So it goes only where `pass_end_user_token` says a downstream needs
        it, never by default (docs/decisions.md, "The end user's token goes only where it is read")."""
        metadata = [("authorization", f"Bearer {service_token}")]
        call = current_call.get(None)
        if call is not None:
            metadata.append((CORRELATION_HEADER, call.correlation_id))
            trace = trace or call.trace
            if trace is not None:
                metadata += trace.child_headers()
            if self.pass_end_user_token and call.bearer and call.principal is not None \
                    and not call.principal.is_service_account:
                metadata.append((END_USER_TOKEN_HEADER, call.bearer))
        return tuple(metadata)

    async def call(self, method: Callable[..., Awaitable[T]], request: Any) -> T:
        """Call METHOD (a stub method of this downstream) with REQUEST; errors arrive as the error table's."""
        served = current_call.get(None)
        if self.spans is None or served is None or served.span is None or served.trace is None:
            return await self._call(method, request, None, _Attempts())
        span, trace = self.spans.calling(path_of(method) or f"/{self.name}/?", self.name, served.span, served.trace,
                                         served.correlation_id)
        attempts = _Attempts()
        try:
            reply = await self._call(method, request, trace, attempts)
        except RequestError as error:
            SpanRecorder.call_ended(span, error.status, attempts.made, str(error))
            raise
        except asyncio.CancelledError:
            SpanRecorder.call_ended(span, grpc.StatusCode.CANCELLED, attempts.made, "cancelled")
            raise
        except BaseException as error:  # the span ends whatever ended the call
            SpanRecorder.call_ended(span, grpc.StatusCode.UNKNOWN, attempts.made, type(error).__name__)
            raise
        SpanRecorder.call_ended(span, grpc.StatusCode.OK, attempts.made)
        return reply

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any, trace: TraceContext | None,
                    attempts: _Attempts) -> T:
        """The call with this service's token; if the downstream refuses the token, once more with a fresh one.

        A refused token is refused by the downstream's interceptor, before any handler runs: nothing happened there,
        so the call may be made again. This is how a service goes on when its token was revoked (a change in
        Keycloak that ends everyone's tokens ends service tokens too): it fetches a new one and the caller sees
        nothing. A fresh token refused as well is this service's credentials being refused: UNAVAILABLE."""
        deadline = time.monotonic() + self.deadline_seconds
        try:
            return await self._send(method, request, trace, attempts, await self._token(deadline), deadline)
        except _TokenRefusedError:
            self.tokens.forget()
        try:
            return await self._send(method, request, trace, attempts, await self._token(deadline), deadline)
        except _TokenRefusedError:
            self.tokens.forget()  # fetch a fresh one next time, too
            raise UnavailableError(f"{self.name} refused this service's credentials") from None

    async def _token(self, deadline: float) -> str:
        """This service's token, waited for only until DEADLINE: python-keycloak would wait a minute for an answer."""
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                return await self.tokens.token()
        except TimeoutError:
            waited = f"{self.deadline_seconds:.1f}s"
            raise UnavailableError(f"no service token to call {self.name} within {waited}") from None

    async def _send(self, method: Callable[..., Awaitable[T]], request: Any, trace: TraceContext | None,
                    attempts: _Attempts, service_token: str, deadline: float) -> T:
        metadata = self.metadata(service_token, trace)

        async def attempt() -> T:
            attempts.made += 1
            remaining = max(deadline - time.monotonic(), 0.001)
            return await method(request, metadata=metadata, timeout=remaining)
        try:
            return await resilient_call(attempt, breaker=self.breaker, budget=self.budget, is_transient=is_transient,
                                        deadline_seconds=max(deadline - time.monotonic(), 0.001))
        except BreakerOpenError:
            raise UnavailableError(f"{self.name} is unavailable (circuit open): try again later") from None
        except DeadlineExceededError:
            raise UnavailableError(f"{self.name} did not answer within {self.deadline_seconds:.1f}s") from None
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise _TokenRefusedError() from None
            passed_on = PASSED_ON.get(error.code())
            if passed_on is not None:
                raise passed_on(error.details() or error.code().name) from None
            raise UnavailableError(f"{self.name} failed: {error.code().name}") from None
