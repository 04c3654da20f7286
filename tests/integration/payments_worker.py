"""A second payments process for the fencing test: a real PaymentsHandlers (Redis lock, fencing token, the
accounts client kit) whose accounts gateway, once it holds the lock, writes MARKER (its fencing token) and then
waits for a line on stdin before calling ApplyTransfer, so that the test can SIGSTOP it while it holds the lock
and let it go on when the test chooses, with no timing race.

Usage (with the BASTION_* environment of the test stack):
    python -m tests.integration.payments_worker FROM TO AMOUNT IDEMPOTENCY_KEY MARKER
Prints one JSON line: the payment, or the status the transfer ended with.
"""

import asyncio
import json
import sys
from pathlib import Path

from bastion.grpc.errors import RequestError
from bastion.runtime import ServiceRuntime
from bastion.settings import DevstackSettings
from services.payments.adapters.gateways import GrpcAccounts
from services.payments.domain import Transfer
from services.payments.handlers import Caller
from services.payments.server import NAME, accounts_downstream, build_handlers
from services.payments.settings import PaymentsSettings
from tests.integration.grpc_harness import user_token


class PausingAccounts:
    def __init__(self, inner: GrpcAccounts, marker: Path) -> None:
        self.inner = inner
        self.marker = marker

    async def owner_of(self, account_id: str) -> str:
        return await self.inner.owner_of(account_id)

    async def apply_transfer(self, transfer_id: str, from_account_id: str, to_account_id: str, amount_minor: int,
                             currency: str, fencing_token: int, idempotency_key: str) -> None:
        written = self.marker.with_suffix(".tmp")
        written.write_text(str(fencing_token))
        written.rename(self.marker)  # the test never reads a half-written token
        # Blocking on purpose, event loop and lock extender included: the SIGSTOP lands here, with the lock held
        # and ApplyTransfer not yet sent; the test's line on stdin lets it go on.
        sys.stdin.readline()
        await self.inner.apply_transfer(transfer_id, from_account_id, to_account_id, amount_minor, currency,
                                        fencing_token, idempotency_key)


async def main(source: str, target: str, amount: str, key: str, marker: str) -> None:
    own = PaymentsSettings()
    runtime = ServiceRuntime.load(NAME, DevstackSettings())
    accounts = PausingAccounts(GrpcAccounts(accounts_downstream(runtime, own)), Path(marker))
    handlers = build_handlers(runtime, own, accounts)
    caller = Caller("alice", str(user_token(runtime.ctx, "alice")["access_token"]))
    try:
        payment = await handlers.transfer(caller, Transfer(source, target, int(amount), "EUR", key))
        print(json.dumps({"status": payment.status.value, "payment_id": payment.payment_id}))
    except RequestError as error:
        print(json.dumps({"status": error.status.name, "detail": str(error)}))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
