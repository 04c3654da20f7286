"""The security interceptor: on every call, in order, correlation id and trace context, peer identity from the
client certificate, JWT authentication, per-method authorisation, rate limit, access audit. A refused call ends
with the status of the error table; the handler never runs. Health checks and reflection need only mTLS."""

import asyncio
import contextlib
import contextvars
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, NoReturn

import grpc
import structlog
from prometheus_client import Counter

from bastion.grpc.audit import AccessAudit, decision
from bastion.grpc.context import MAX_METHOD, CallContext, correlation_id_from, current_call, peer_identity_from
from bastion.grpc.errors import (
    PermissionDeniedError,
    RequestError,
    UnauthenticatedError,
    UnavailableError,
    status_for,
)
from bastion.grpc.policy import MethodPolicy
from bastion.grpc.ratelimit import RedisRateLimiter
from bastion.grpc.spans import SpanRecorder
from bastion.grpc.tokens import AuthenticationError, AuthReason, KeysMustBeFetchedError, Principal, TokenValidator
from bastion.grpc.trace import trace_context_from

log = structlog.get_logger(__name__)
CALLS_REFUSED = Counter("bastion_grpc_refused_total", "Calls refused by the security interceptor",
                        ["service", "method", "code"])
TRANSPORT_ONLY = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# The metric label of a call to a path this server does not serve: the path is the caller's text, and one series
# per path would let any caller grow the metrics without bound. Logs and the access audit keep the path (cut).
UNKNOWN_METHOD = "(unknown method)"
# The call's metadata as grpc.aio already converted it for `intercept_service` (HandlerCallDetails), handed to
# the wrapped handler: `context.invocation_metadata()` would convert it from C again, bearer token and all (about
# 8 µs a call on the server, measured in place). Each call runs in a task of its own, so a value set here is seen
# by this call's handler only; a handler reached without it reads the context's.
_call_metadata: contextvars.ContextVar[Sequence[tuple[str, str | bytes]]] = contextvars.ContextVar(
    "bastion_call_metadata")


class SecurityInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, service: str, validator: TokenValidator, policy: MethodPolicy, audit: AccessAudit,
                 limiter: RedisRateLimiter | None = None, spans: SpanRecorder | None = None) -> None:
        self.service = service
        self.validator = validator
        self.policy = policy
        self.audit = audit
        self.limiter = limiter
        self.spans = spans
        # The wrapped handler of each method, built once: it holds no per-call state, and building it on every
        # call was a measurable share of the chain's cost. Kept with the handler it wraps, in case that changes.
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(details)
        method: str = details.method
        if method.startswith(TRANSPORT_ONLY):
            return handler
        _call_metadata.set(details.invocation_metadata or ())
        if handler is None:
            return grpc.unary_unary_rpc_method_handler(self._refuse_unknown(method))
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[method] = (handler, self._wrap(handler, method))
        return cached[1]

    def _refuse_unknown(self, method: str) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]:
        async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
            await self._admit(method, context)  # authenticates and audits; the policy has no rule: denied
            # Never reached while the policy holds rules only for served methods, whose canonical paths gRPC routes;
            # should that ever break, the call still ends here, refused, rather than answered with nothing.
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"no method {method[:MAX_METHOD]}")

        return refuse

    def _wrap(self, handler: Any, method: str) -> Any:
        if handler.unary_unary or handler.stream_unary:
            inner = handler.unary_unary or handler.stream_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                call = await self._admit(method, context)
                token = current_call.set(call)
                try:
                    reply = await inner(request, context)
                    if call.span is not None:
                        _end_span(call, _answered_with(context))
                    return reply
                except Exception as error:
                    await self._fail(context, call, error)
                finally:
                    _end_span(call, grpc.StatusCode.CANCELLED)  # a no-op unless the call ended some other way
                    current_call.reset(token)

            factory = (grpc.unary_unary_rpc_method_handler if handler.unary_unary
                       else grpc.stream_unary_rpc_method_handler)
            return factory(unary, request_deserializer=handler.request_deserializer,
                           response_serializer=handler.response_serializer)
        inner_stream = handler.unary_stream or handler.stream_stream

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = await self._admit(method, context)
            token = current_call.set(call)
            try:
                async for item in inner_stream(request, context):
                    # Admitted once, a stream may stay open for its token's whole life: each message goes out only
                    # while the token still passes (a sign-out or revocation since ends the stream).
                    await self._still_authenticated(context, call)
                    yield item
                if call.span is not None:
                    _end_span(call, _answered_with(context))
            except Exception as error:
                await self._fail(context, call, error)
            finally:
                _end_span(call, grpc.StatusCode.CANCELLED)  # a no-op unless the call ended some other way
                # A stream cancelled while blocked writing is closed later, in another context: the variable is
                # then not this context's to reset, and that context is being discarded anyway.
                with contextlib.suppress(ValueError):
                    current_call.reset(token)

        factory = (grpc.unary_stream_rpc_method_handler if handler.unary_stream
                   else grpc.stream_stream_rpc_method_handler)
        return factory(streaming, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)

    async def _admit(self, method: str, context: grpc.aio.ServicerContext) -> CallContext:
        received = _call_metadata.get(None)
        if received is None:
            received = context.invocation_metadata() or ()
        metadata = {key: value for key, value in received if isinstance(value, str)}
        correlation_id = correlation_id_from(metadata)
        trace = trace_context_from(received)
        # Whether to record this call is asked now (and its arrival noted), but a span is started only once the
        # call is admitted: a caller's sampled flag alone never makes the service record anything.
        traced = self.spans is not None and self.spans.wanted(trace)
        arrived = time.time_ns() if traced else 0
        context.set_trailing_metadata((("x-correlation-id", correlation_id),))
        peer = peer_identity_from(context.peer_identity_key(), context.peer_identities())
        header = metadata.get("authorization", "")
        try:
            if peer is None:
                raise UnauthenticatedError("client certificate has no Bastion identity")
            try:
                principal = self._authenticate(header, correlation_id)
            except KeysMustBeFetchedError:
                # Keycloak is asked from a worker thread: a slow or hung Keycloak (up to the fetch's timeout) must
                # not stall every other call of this server, as it did when the event loop fetched.
                principal = await asyncio.to_thread(self._authenticate, header, correlation_id, True)
        except RequestError as error:
            await self._refuse(context, CallContext(correlation_id, peer, None, method, trace=trace), error)
        call = CallContext(correlation_id, peer, principal, method, bearer=header.partition(" ")[2], trace=trace)
        verdict = self.policy.decide(method, principal, peer)
        if not verdict.allowed:
            await self._refuse(context, call, PermissionDeniedError(f"permission denied: {verdict.reason}"))
        if self.limiter is not None:
            try:
                # The service budget needs the service's own certificate too, not just a token that looks like one.
                service_account = principal.is_service_account and peer == principal.client_id
                await self.limiter.admit(f"{principal.client_id}:{principal.subject}", service_account)
            except RequestError as error:
                await self._refuse(context, call, error)
        self.audit.record(decision(_who(principal), peer or "", method, True, verdict.reason, correlation_id))
        if traced and self.spans is not None:
            span, trace = self.spans.start(method, trace, arrived)
            if span is not None:
                return replace(call, trace=trace, span=span)
        return call

    async def _still_authenticated(self, context: grpc.aio.ServicerContext, call: CallContext) -> None:
        """Refuse CALL now if its token no longer passes (a remembered verdict: expiry, key, revocations)."""
        try:
            try:
                self._validated(call.bearer or "", call.correlation_id)
            except KeysMustBeFetchedError:
                await asyncio.to_thread(self._validated, call.bearer or "", call.correlation_id, True)
        except RequestError as error:
            await self._refuse(context, call, error)

    def _authenticate(self, header: str, correlation_id: str, may_fetch: bool = False) -> Principal:
        """The principal of the bearer token in HEADER; raises the RequestError that refuses the call, or
        KeysMustBeFetchedError unless MAY_FETCH (off the event loop)."""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise UnauthenticatedError("missing bearer token")
        return self._validated(token, correlation_id, may_fetch)

    def _validated(self, token: str, correlation_id: str, may_fetch: bool = False) -> Principal:
        try:
            return self.validator.validate(token, may_fetch)
        except KeysMustBeFetchedError:
            raise  # no verdict yet: asked again from a worker thread
        except AuthenticationError as error:
            if error.reason == AuthReason.KEYS_UNAVAILABLE:
                raise UnavailableError("token keys unavailable: request refused") from error
            if error.reason == AuthReason.REVOCATIONS_UNAVAILABLE:
                raise UnavailableError(f"token revocations unavailable: request refused ({error.detail})") from error
            raise UnauthenticatedError(f"invalid token: {error}") from error
        except Exception as error:
            # A fault of the check itself (a token no rule foresaw): the token is not authenticated. The call is
            # refused and audited like any other, the fault logged with its stack for the operator; neither the
            # caller nor gRPC's default answer gets the exception's text.
            log.exception("token_check_failed", service=self.service, error=type(error).__name__,
                          correlation_id=correlation_id)
            raise UnauthenticatedError("invalid token: it could not be checked") from error

    async def _refuse(self, context: grpc.aio.ServicerContext, call: CallContext, error: RequestError) -> NoReturn:
        code, message = status_for(error, call.correlation_id)
        self.audit.record(decision(_who(call.principal), call.peer_identity or "", call.method, False, message,
                                   call.correlation_id))
        served = call.method in self._wrapped  # every served method is wrapped before its first call runs
        CALLS_REFUSED.labels(self.service, call.method if served else UNKNOWN_METHOD, code.name).inc()
        log.warning("call_refused", service=self.service, method=call.method[:MAX_METHOD], code=code.name,
                    reason=message, peer=call.peer_identity, principal=_who(call.principal),
                    correlation_id=call.correlation_id, trace_id=_trace_id(call))
        await context.abort(code, message)
        raise AssertionError("unreachable: abort raises")

    async def _fail(self, context: grpc.aio.ServicerContext, call: CallContext, error: Exception) -> None:
        """A handler's error, answered from the error table; anything unexpected is logged here with its
        stack and answered INTERNAL with only the correlation id, so no detail reaches the caller."""
        if isinstance(error, grpc.aio.AbortError):
            _end_span(call, _aborted_with(context))
            raise error
        code, message = status_for(error, call.correlation_id)
        CALLS_REFUSED.labels(self.service, call.method, code.name).inc()
        if isinstance(error, RequestError):
            log.info("call_failed", service=self.service, method=call.method, code=code.name, reason=message,
                     correlation_id=call.correlation_id, trace_id=_trace_id(call))
        else:
            log.exception("call_crashed", service=self.service, method=call.method,
                          correlation_id=call.correlation_id, trace_id=_trace_id(call))
        _end_span(call, code)
        await context.abort(code, message)


def _end_span(call: CallContext, code: grpc.StatusCode) -> None:
    if call.span is not None:
        SpanRecorder.end(call.span, code, call.correlation_id, call.peer_identity)


def _aborted_with(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The code a handler aborted its call with (grpc.aio keeps it on the context)."""
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _answered_with(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The code of a call its handler returned from: OK, unless the handler set another (`context.set_code`)."""
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK


def _trace_id(call: CallContext) -> str | None:
    return call.trace.trace_id if call.trace is not None else None


def _who(principal: Principal | None) -> str:
    if principal is None:
        return ""
    return principal.username or principal.client_id
