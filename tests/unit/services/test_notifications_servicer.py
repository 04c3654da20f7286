"""The notifications gRPC servicer on in-memory adapters: the caller is the token's username and sees only their
own notifications, a page by default, streams that end with the token, and a few open streams per caller."""

import asyncio
import datetime as dt
import threading
from collections.abc import AsyncGenerator, Awaitable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bastion.grpc.context import CallContext, current_call
from bastion.grpc.errors import UnauthenticatedError
from bastion.grpc.tokens import Principal
from bastion.notifications.v1 import notifications_pb2
from services.notifications.adapters.at_rest import AtRestCipher
from services.notifications.adapters.grpc import NotificationsServicer
from services.notifications.domain import Draft, StreamExpiredError, TooManyStreamsError
from services.notifications.fakes import MemoryUnitOfWork
from services.notifications.handlers import NotificationsHandlers
from tests.unit.services.admitted import admitted

EXPIRES = 2_000_000_000
BEFORE_EXPIRY = dt.datetime.fromtimestamp(EXPIRES - 60, dt.UTC)
CREATED = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def user(username: str | None) -> Principal:
    return Principal(f"sub-{username}", username, "bastion-cli", frozenset({"customer"}), "jti-1", EXPIRES)


ALICE, BOB = user("alice"), user("bob")


def calling_as(principal: Principal | None) -> None:
    """PRINCIPAL in the call's context, as the security interceptor leaves it (for the current task)."""
    current_call.set(CallContext("corr-1", "cli", principal, "/bastion.notifications.v1.Notifications/Test"))


def as_(principal: Principal | None, rpc: Awaitable[Any]) -> Any:
    """Run RPC as the interceptor would have admitted it: PRINCIPAL in the call's context."""
    return admitted(principal, rpc, "/bastion.notifications.v1.Notifications/Test")


@dataclass
class ThreadNotingUnitOfWork(MemoryUnitOfWork):
    """Notes the thread each transaction runs on: database I/O must never block the server's event loop."""

    threads: list[threading.Thread] = field(default_factory=list)

    def __call__(self) -> AbstractContextManager[MemoryUnitOfWork]:  # type: ignore[override]
        self.threads.append(threading.current_thread())
        return super().__call__()


@pytest.fixture()
def uow() -> ThreadNotingUnitOfWork:
    return ThreadNotingUnitOfWork()


@pytest.fixture()
def servicer(uow: ThreadNotingUnitOfWork, tmp_path: Path) -> NotificationsServicer:
    handlers = NotificationsHandlers(
        uow, None, AtRestCipher.generate(tmp_path / "at-rest.key"), clock=lambda: BEFORE_EXPIRY
    )
    return NotificationsServicer(handlers, poll_seconds=0.01)


def open_stream(
    servicer: NotificationsServicer, request: notifications_pb2.StreamNotificationsRequest
) -> AsyncGenerator[notifications_pb2.StreamNotificationsResponse, None]:
    """StreamNotifications as gRPC runs it: an async generator, closed when the client goes away."""
    stream = servicer.StreamNotifications(request, None)
    assert isinstance(stream, AsyncGenerator)
    return stream


def told(uow: MemoryUnitOfWork, recipient: str, count: int = 1) -> None:
    with uow() as tx:
        for n in range(count):
            tx.notifications.append(
                Draft(recipient, "test", f"{recipient} {n + 1}"),
                f"id-{recipient}-{n + 1}",
                f"event-{recipient}-{n + 1}",
                CREATED,
            )


def test_a_listing_is_the_callers_own_notifications_a_page_of_100_unless_asked_otherwise(
    servicer: NotificationsServicer, uow: MemoryUnitOfWork
) -> None:
    told(uow, "alice", 101)
    told(uow, "bob")
    page = as_(ALICE, servicer.ListNotifications(notifications_pb2.ListNotificationsRequest(), None)).notifications
    assert [n.sequence for n in page] == list(range(1, 101))
    first = page[0]
    assert (first.notification_id, first.kind, first.text, first.event_id) == (
        "id-alice-1",
        "test",
        "alice 1",
        "event-alice-1",
    )
    assert first.created_at.ToDatetime(dt.UTC) == CREATED
    request = notifications_pb2.ListNotificationsRequest(after_sequence=100, limit=5)
    assert [n.text for n in as_(ALICE, servicer.ListNotifications(request, None)).notifications] == ["alice 101"]
    assert [n.text for n in as_(BOB, servicer.ListNotifications(request, None)).notifications] == []


@pytest.mark.parametrize("principal", [None, user(None), user("")])
def test_a_call_without_an_end_user_is_unauthenticated(
    servicer: NotificationsServicer, principal: Principal | None
) -> None:
    with pytest.raises(UnauthenticatedError, match="no authenticated end user"):
        as_(principal, servicer.ListNotifications(notifications_pb2.ListNotificationsRequest(), None))


def test_a_stream_starts_after_the_sequence_asked_for(servicer: NotificationsServicer, uow: MemoryUnitOfWork) -> None:
    told(uow, "alice", 3)
    stream = open_stream(servicer, notifications_pb2.StreamNotificationsRequest(after_sequence=2))
    assert as_(ALICE, anext(stream)).notification.sequence == 3


def test_a_stream_ends_when_the_callers_token_does(servicer: NotificationsServicer, uow: MemoryUnitOfWork) -> None:
    told(uow, "alice")
    servicer.handlers.clock = lambda: dt.datetime.fromtimestamp(EXPIRES, dt.UTC)
    stream = open_stream(servicer, notifications_pb2.StreamNotificationsRequest())
    with pytest.raises(StreamExpiredError):
        as_(ALICE, asyncio.wait_for(anext(stream), 2))


def test_a_caller_holds_at_most_five_streams_and_a_closed_one_is_counted_out(
    servicer: NotificationsServicer, uow: MemoryUnitOfWork
) -> None:
    told(uow, "alice")
    told(uow, "bob")
    request = notifications_pb2.StreamNotificationsRequest()

    async def scenario() -> None:
        calling_as(ALICE)
        streams = [open_stream(servicer, request) for _ in range(5)]
        for stream in streams:
            await anext(stream)  # inside the handler: the stream counts
        with pytest.raises(TooManyStreamsError, match="at most 5 open streams"):
            await anext(open_stream(servicer, request))
        calling_as(BOB)
        await anext(open_stream(servicer, request))  # another caller has streams of their own
        calling_as(ALICE)
        await streams.pop().aclose()
        streams.append(open_stream(servicer, request))
        await anext(streams[-1])
        for stream in streams:
            await stream.aclose()

    asyncio.run(scenario())


def test_listing_and_streaming_read_the_store_off_the_event_loop(
    servicer: NotificationsServicer, uow: ThreadNotingUnitOfWork
) -> None:
    told(uow, "alice", 2)
    seeded = len(uow.threads)
    as_(ALICE, servicer.ListNotifications(notifications_pb2.ListNotificationsRequest(), None))
    stream = open_stream(servicer, notifications_pb2.StreamNotificationsRequest(after_sequence=1))
    as_(ALICE, anext(stream))
    assert len(uow.threads) == seeded + 2 and threading.main_thread() not in uow.threads[seeded:]
