"""The accounts service process: wires settings, the kit and the adapters, then serves until stopped.

Run by the devstack as `python -m services.accounts.server`; settings come from the BASTION_* environment.
"""

import asyncio
import threading

from bastion import service_logs
from bastion.accounts.v1 import accounts_pb2, accounts_pb2_grpc
from bastion.grpc.server import start_server
from bastion.runtime import ServiceRuntime
from bastion.settings import DevstackSettings
from services.accounts.adapters.grpc import AccountsServicer
from services.accounts.adapters.personal_data import SealedForReaders
from services.accounts.adapters.postgres import PostgresUnitOfWork, create_schema
from services.accounts.handlers import AccountsHandlers

NAME = "accounts"


async def serve(settings: DevstackSettings) -> None:
    runtime = ServiceRuntime.load(NAME, settings)
    create_schema(runtime.engine)
    handlers = AccountsHandlers(PostgresUnitOfWork(runtime.engine, runtime.outbox()),
                                SealedForReaders(runtime.data_keys()))
    stop = threading.Event()
    runtime.start_revocation_feed(stop)  # before serving: tokens are refused until it was read
    runtime.start_relay(stop)
    server, port = await start_server(
        runtime.security(),
        lambda s: accounts_pb2_grpc.add_AccountsServicer_to_server(  # type: ignore[no-untyped-call]
            AccountsServicer(handlers), s),
        [accounts_pb2.DESCRIPTOR.services_by_name["Accounts"]],
        port=runtime.grpc_port, host=settings.bind_host, dev_profile=settings.dev_profile,
        health_servicer=runtime.health_servicer,
    )
    await runtime.serve_until_stopped(server, port, stop)


def main() -> None:
    service_logs.configure(NAME)
    asyncio.run(serve(DevstackSettings()))


if __name__ == "__main__":
    main()
