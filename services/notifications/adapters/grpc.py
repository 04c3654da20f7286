"""The notifications gRPC servicer: parse the request, call the handler, translate back. Nothing else."""

import asyncio
import datetime as dt
from collections import Counter
from collections.abc import AsyncIterator

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from bastion.grpc.context import current_call
from bastion.grpc.errors import UnauthenticatedError
from bastion.notifications.v1 import notifications_pb2, notifications_pb2_grpc
from services.notifications.domain import Notification, TooManyStreamsError
from services.notifications.handlers import Caller, NotificationsHandlers, NotificationStream

DEFAULT_PAGE = 100
# Each open stream polls the database: a few per person (a phone, a laptop) is plenty, hundreds are an attack.
MAX_STREAMS_PER_CALLER = 5


def _caller() -> tuple[Caller, dt.datetime]:
    principal = current_call.get().principal
    if principal is None or not principal.username:  # the policy admits end users (customers, auditors) only
        raise UnauthenticatedError("no authenticated end user")
    return Caller(principal.username, principal.roles), dt.datetime.fromtimestamp(principal.expires_at, dt.UTC)


def _notification(notification: Notification) -> notifications_pb2.Notification:
    created_at = Timestamp()
    created_at.FromDatetime(notification.created_at)
    return notifications_pb2.Notification(
        notification_id=notification.notification_id, sequence=notification.sequence, kind=notification.kind,
        text=notification.text, created_at=created_at, event_id=notification.event_id)


class NotificationsServicer(notifications_pb2_grpc.NotificationsServicer):
    def __init__(self, handlers: NotificationsHandlers, poll_seconds: float = 0.5,
                 max_streams_per_caller: int = MAX_STREAMS_PER_CALLER) -> None:
        self.handlers = handlers
        self.poll_seconds = poll_seconds
        self.max_streams_per_caller = max_streams_per_caller
        # Open streams per caller, in this process (every stream runs on its event loop, so no lock is needed).
        self.open_streams: Counter[str] = Counter()

    async def ListNotifications(self, request: notifications_pb2.ListNotificationsRequest,
                                context: grpc.aio.ServicerContext) -> notifications_pb2.ListNotificationsResponse:
        caller, _ = _caller()
        found = await asyncio.to_thread(self.handlers.list_notifications, caller, request.after_sequence,
                                        request.limit or DEFAULT_PAGE)
        return notifications_pb2.ListNotificationsResponse(notifications=[_notification(n) for n in found])

    async def StreamNotifications(self, request: notifications_pb2.StreamNotificationsRequest,
                                  context: grpc.aio.ServicerContext
                                  ) -> AsyncIterator[notifications_pb2.StreamNotificationsResponse]:
        caller, expires_at = _caller()
        if self.open_streams[caller.username] >= self.max_streams_per_caller:
            raise TooManyStreamsError(f"at most {self.max_streams_per_caller} open streams per caller: close one first")
        stream = NotificationStream(self.handlers, caller, request.after_sequence, self.poll_seconds,
                                    expires_at=expires_at)
        self.open_streams[caller.username] += 1
        try:
            async for notification in stream:
                yield notifications_pb2.StreamNotificationsResponse(notification=_notification(notification))
        finally:
            self.open_streams[caller.username] -= 1
