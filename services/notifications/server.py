"""The notifications service process: wires settings, the kit and the adapters, then serves until stopped.

Run by the devstack as `python -m services.notifications.server`; settings come from the BASTION_* environment.
"""

import asyncio
import threading

from bastion import service_logs
from bastion.audit.alert_recipients import load_alert_recipients
from bastion.audit.alerts import ALERTS_TOPIC
from bastion.grpc.server import start_server
from bastion.notifications.v1 import notifications_pb2, notifications_pb2_grpc
from bastion.runtime import ServiceRuntime
from bastion.settings import DevstackSettings
from services.notifications.adapters.at_rest import AtRestCipher
from services.notifications.adapters.grpc import NotificationsServicer
from services.notifications.adapters.postgres import PostgresUnitOfWork, consumer_handler, create_schema
from services.notifications.handlers import NotificationsHandlers
from services.notifications.settings import NotificationsSettings

NAME = "notifications"
TOPICS = ["accounts.events.v1", "payments.events.v1", ALERTS_TOPIC]


async def serve(settings: DevstackSettings, own: NotificationsSettings) -> None:
    runtime = ServiceRuntime.load(NAME, settings)
    recipients = load_alert_recipients(settings.infra_dir / "alert-recipients.yaml")
    create_schema(runtime.engine)
    handlers = NotificationsHandlers(PostgresUnitOfWork(runtime.engine), runtime.data_keys(),
                                     AtRestCipher(runtime.ctx.layout.at_rest_key(NAME)), alert_recipients=recipients)
    stop = threading.Event()
    runtime.start_revocation_feed(stop)  # before serving: tokens are refused until it was read
    runtime.start_relay(stop)  # the consumer's security records (rejected events) leave through the outbox
    runtime.start_consumer(TOPICS, consumer_handler(handlers), stop)
    server, port = await start_server(
        runtime.security(),
        lambda s: notifications_pb2_grpc.add_NotificationsServicer_to_server(  # type: ignore[no-untyped-call]
            NotificationsServicer(handlers, own.stream_poll_seconds), s),
        [notifications_pb2.DESCRIPTOR.services_by_name["Notifications"]],
        port=runtime.grpc_port, host=settings.bind_host, dev_profile=settings.dev_profile,
        health_servicer=runtime.health_servicer,
    )
    await runtime.serve_until_stopped(server, port, stop)


def main() -> None:
    service_logs.configure(NAME)
    asyncio.run(serve(DevstackSettings(), NotificationsSettings()))


if __name__ == "__main__":
    main()
