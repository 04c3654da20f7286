"""The client factory's spans: a call made on behalf of a recorded call is a CLIENT span of the caller's trace, from
its start to its outcome (retries and an open breaker included), and the downstream's span is its child."""

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from bastion.accounts.v1 import accounts_pb2_grpc
from bastion.grpc.client import Downstream, is_unhealthy, path_of
from bastion.grpc.context import CallContext, current_call
from bastion.grpc.errors import NotFoundError, UnavailableError
from bastion.grpc.spans import SPANS_NOT_RECORDED, SpanRecorder
from bastion.grpc.trace import TRACEPARENT, trace_context_from
from bastion.resilience.breaker import memory_breaker
from bastion.resilience.retry import RetryBudget

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
SERVED = "/bastion.payments.v1.Payments/Transfer"
GET_ACCOUNT = "/bastion.accounts.v1.Accounts/GetAccount"


class Tokens:
    async def token(self) -> str:
        return "service-token"

    def forget(self) -> None:
        pass


class Accounts:
    """A stub method of the downstream: answers with the given outcomes in turn, keeping what each call was sent."""

    _method = GET_ACCOUNT.encode()

    def __init__(self, *outcomes: grpc.StatusCode) -> None:
        self.outcomes = list(outcomes)
        self.sent: list[dict[str, str]] = []

    async def __call__(self, request: str, metadata: tuple[tuple[str, str], ...], timeout: float) -> str:
        self.sent.append(dict(metadata))
        code = self.outcomes.pop(0) if self.outcomes else grpc.StatusCode.OK
        if code != grpc.StatusCode.OK:
            raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=f"{code.name} here")
        return f"account of {request}"


def recorder(per_second: float = 100.0) -> tuple[SpanRecorder, InMemorySpanExporter]:
    exported = InMemorySpanExporter()
    # A clock that stands still: the budget never refills during a test, however slow the machine.
    return SpanRecorder("payments", processor=SimpleSpanProcessor(exported), per_second=per_second,
                        clock=lambda: 0.0), exported


def downstream(spans: SpanRecorder | None, fail_max: int = 5) -> Downstream:
    breaker = memory_breaker("payments-accounts", is_failure=is_unhealthy, fail_max=fail_max, reset_timeout=60)
    return Downstream("accounts", None, Tokens(), breaker, RetryBudget(), deadline_seconds=2.0,  # type: ignore[arg-type]
                      spans=spans)


def on_behalf_of_a_call(spans: SpanRecorder, sampled: bool, call: Callable[[], Awaitable[Any]]) -> tuple[Any, Any]:
    """Run CALL inside a served call of the caller's trace (sampled or not) whose span SPANS recorded when it
    wanted to; (what CALL returned or raised, the served call's context)."""
    trace = trace_context_from([(TRACEPARENT, f"00-{TRACE}-{CALLER_SPAN}-{'01' if sampled else '00'}")])
    span = None
    if spans.wanted(trace):
        span, trace = spans.start(SERVED, trace, time.time_ns())
    served = CallContext("corr-client-spans", "web", None, SERVED, trace=trace, span=span)

    async def run() -> Any:
        token = current_call.set(served)
        try:
            return await call()
        except Exception as error:
            return error
        finally:
            current_call.reset(token)
            SpanRecorder.end(span, grpc.StatusCode.OK, served.correlation_id, served.peer_identity)

    return asyncio.run(run()), served


def client_spans(exported: InMemorySpanExporter) -> list[ReadableSpan]:
    return [span for span in exported.get_finished_spans() if span.kind == SpanKind.CLIENT]


def test_a_call_made_for_a_recorded_call_is_a_client_span_whose_id_the_downstream_is_sent_as_its_parent() -> None:
    spans, exported = recorder()
    accounts = Accounts()
    reply, served = on_behalf_of_a_call(spans, True, lambda: downstream(spans).call(accounts, "acc-1"))
    assert reply == "account of acc-1"
    [client] = client_spans(exported)
    assert client.name == GET_ACCOUNT.lstrip("/")
    assert client.parent is not None and client.parent.span_id == served.span.get_span_context().span_id
    assert client.context.trace_id == int(TRACE, 16)
    assert dict(client.attributes or {}) == {
        "rpc.system": "grpc", "rpc.service": "bastion.accounts.v1.Accounts", "rpc.method": "GetAccount",
        "server.address": "accounts", "bastion.correlation_id": "corr-client-spans", "rpc.grpc.status_code": 0,
        "bastion.attempts": 1}
    assert client.status.status_code == StatusCode.UNSET
    [sent] = accounts.sent
    assert sent[TRACEPARENT] == f"00-{TRACE}-{client.context.span_id:016x}-01", "the downstream's span is its child"
    assert sent["x-correlation-id"] == "corr-client-spans"


def test_retries_stay_inside_the_one_span_of_the_call_and_are_counted() -> None:
    spans, exported = recorder()
    accounts = Accounts(grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE)
    reply, _ = on_behalf_of_a_call(spans, True, lambda: downstream(spans).call(accounts, "acc-1"))
    assert reply == "account of acc-1"
    [client] = client_spans(exported)
    assert client.attributes is not None and client.attributes["bastion.attempts"] == 3
    assert client.status.status_code == StatusCode.UNSET
    assert len({sent[TRACEPARENT] for sent in accounts.sent}) == 1, "every attempt names the same client span"


@pytest.mark.parametrize(("answers", "error", "code"), [
    ((grpc.StatusCode.NOT_FOUND,), NotFoundError, grpc.StatusCode.NOT_FOUND),
    ((grpc.StatusCode.INTERNAL,), UnavailableError, grpc.StatusCode.UNAVAILABLE),
    # this service's token refused, and the fresh one too
    ((grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED), UnavailableError,
     grpc.StatusCode.UNAVAILABLE),
])
def test_a_call_that_failed_is_an_error_span_with_the_code_and_message_its_caller_got(
        answers: tuple[grpc.StatusCode, ...], error: type[Exception], code: grpc.StatusCode) -> None:
    spans, exported = recorder()
    raised, _ = on_behalf_of_a_call(spans, True, lambda: downstream(spans).call(Accounts(*answers), "acc-1"))
    assert isinstance(raised, error)
    [client] = client_spans(exported)
    assert client.attributes is not None and client.attributes["rpc.grpc.status_code"] == code.value[0]
    assert client.status.status_code == StatusCode.ERROR and client.status.description == str(raised)


def test_a_call_an_open_breaker_stopped_is_an_error_span_of_no_attempt() -> None:
    spans, exported = recorder()
    target = downstream(spans, fail_max=1)
    first, _ = on_behalf_of_a_call(spans, True, lambda: target.call(Accounts(*[grpc.StatusCode.INTERNAL] * 4), "a"))
    stopped, _ = on_behalf_of_a_call(spans, True, lambda: target.call(Accounts(), "acc-1"))
    assert isinstance(first, UnavailableError) and isinstance(stopped, UnavailableError)
    assert "circuit open" in str(stopped)
    opened, refused = client_spans(exported)
    assert opened.attributes is not None and opened.attributes["bastion.attempts"] == 1
    assert refused.attributes is not None and refused.attributes["bastion.attempts"] == 0
    assert refused.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert refused.status.status_code == StatusCode.ERROR and "circuit open" in str(refused.status.description)


def test_a_call_made_for_a_call_not_recorded_leaves_no_span_and_names_the_served_calls_span() -> None:
    spans, exported = recorder()
    accounts = Accounts()
    reply, served = on_behalf_of_a_call(spans, False, lambda: downstream(spans).call(accounts, "acc-1"))
    assert reply == "account of acc-1"
    assert exported.get_finished_spans() == ()
    assert accounts.sent[0][TRACEPARENT] == f"00-{TRACE}-{served.trace.span_id}-00"


def test_without_a_recorder_a_call_sends_the_served_calls_span_as_before() -> None:
    spans, exported = recorder()
    accounts = Accounts()
    reply, served = on_behalf_of_a_call(spans, True, lambda: downstream(None).call(accounts, "acc-1"))
    assert reply == "account of acc-1"
    assert client_spans(exported) == []
    assert accounts.sent[0][TRACEPARENT] == f"00-{TRACE}-{served.trace.span_id}-01"


def test_over_the_span_budget_a_call_is_not_recorded_but_counted_and_its_trace_goes_on() -> None:
    spans, exported = recorder(per_second=1)  # the served call's span takes the one span of the budget
    accounts = Accounts()
    before = SPANS_NOT_RECORDED.labels("payments")._value.get()
    reply, served = on_behalf_of_a_call(spans, True, lambda: downstream(spans).call(accounts, "acc-1"))
    assert reply == "account of acc-1"
    assert client_spans(exported) == []
    assert SPANS_NOT_RECORDED.labels("payments")._value.get() == before + 1
    assert accounts.sent[0][TRACEPARENT] == f"00-{TRACE}-{served.trace.span_id}-01"


def test_the_path_of_a_generated_stub_method_names_the_span() -> None:
    async def path() -> str:
        channel = grpc.aio.secure_channel("localhost:1", grpc.ssl_channel_credentials())
        try:
            return path_of(accounts_pb2_grpc.AccountsStub(channel).GetAccount)  # type: ignore[no-untyped-call]
        finally:
            await channel.close()

    assert asyncio.run(path()) == GET_ACCOUNT
    assert path_of(lambda: None) == ""

