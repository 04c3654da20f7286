"""The demo scenario: the bank at work on the running platform, each step narrated and checked."""

import uuid
from collections.abc import Callable
from typing import Any

import grpc
from keycloak import KeycloakOpenID

from bastion.accounts.v1 import accounts_pb2, accounts_pb2_grpc
from bastion.devstack.context import StackContext
from bastion.devstack.errors import DevstackError
from bastion.grpc.channels import call_metadata, channel_credentials
from bastion.grpc.server import TlsFiles
from bastion.payments.v1 import payments_pb2, payments_pb2_grpc


class Scenario:
    def __init__(self, ctx: StackContext, say: Callable[[str], None]) -> None:
        self.ctx = ctx
        self.say = say
        cli = ctx.pki.paths("cli")
        credentials = channel_credentials(TlsFiles(cli.cert, cli.key, ctx.ca_file))
        offset, host = ctx.settings.service_port_offset, ctx.settings.public_host
        ports = {s.name: s.grpc_port + offset for s in ctx.services}
        self.accounts = accounts_pb2_grpc.AccountsStub(  # type: ignore[no-untyped-call]
            grpc.secure_channel(f"{host}:{ports['accounts']}", credentials))
        self.payments = payments_pb2_grpc.PaymentsStub(  # type: ignore[no-untyped-call]
            grpc.secure_channel(f"{host}:{ports['payments']}", credentials))
        self.keycloak = KeycloakOpenID(server_url=f"https://{host}:{ctx.settings.keycloak_port}/",
                                       realm_name="bastion", client_id="bastion-cli", verify=str(ctx.ca_file))
        self.correlation_id = f"demo-{uuid.uuid4()}"

    def _as(self, user: str) -> tuple[tuple[str, str], ...]:
        token = self.keycloak.token(user, self.ctx.credentials.users[user])["access_token"]
        return call_metadata(str(token), self.correlation_id)

    def run(self) -> None:
        try:
            self._steps()
        except grpc.RpcError as error:
            raise DevstackError(f"the demo scenario failed: {error.code().name}: {error.details()}",
                                "see `bastion status` and the service logs in the state folder") from None

    def _steps(self) -> None:
        say = self.say
        alice = self.accounts.OpenAccount(accounts_pb2.OpenAccountRequest(currency="EUR"),
                                          metadata=self._as("alice"), timeout=20).account
        bob = self.accounts.OpenAccount(accounts_pb2.OpenAccountRequest(currency="EUR"),
                                        metadata=self._as("bob"), timeout=20).account
        say(f"1. alice and bob each opened a EUR account ({alice.account_id[:8]}…, {bob.account_id[:8]}…)")
        self.accounts.Deposit(accounts_pb2.DepositRequest(account_id=alice.account_id, amount_minor=100_000,
                                                          idempotency_key=f"demo-deposit-{uuid.uuid4()}"),
                              metadata=self._as("tina"), timeout=20)
        say("2. tina the teller deposited 1,000.00 EUR into alice's account")
        request = payments_pb2.TransferRequest(idempotency_key=f"demo-transfer-{uuid.uuid4()}",
                                               from_account_id=alice.account_id, to_account_id=bob.account_id,
                                               amount_minor=25_000, currency="EUR")
        payment = self.payments.Transfer(request, metadata=self._as("alice"), timeout=30).payment
        again = self.payments.Transfer(request, metadata=self._as("alice"), timeout=30).payment
        say(f"3. alice sent 250.00 EUR to bob: payment {payment.status}; sent again with the same idempotency "
            f"key, the answer is the same payment ({again.payment_id == payment.payment_id}) and no second debit")
        try:
            self.accounts.GetAccount(accounts_pb2.GetAccountRequest(account_id=alice.account_id),
                                     metadata=self._as("bob"), timeout=20)
            raise DevstackError("bob could read alice's account", "this is a security bug: report it")
        except grpc.RpcError as error:
            say(f"4. bob tried to read alice's account: {error.code().name} (he cannot even learn it exists)")
        balances = {name: self._balance(account.account_id) for name, account in (("alice", alice), ("bob", bob))}
        if balances != {"alice": 75_000, "bob": 25_000}:
            raise DevstackError(f"unexpected balances {balances}", "see the accounts service log")
        say("5. balances checked by sam (support): alice 750.00 EUR, bob 250.00 EUR; money is conserved")
        say(f"every call carried the correlation id {self.correlation_id}; every access decision and state change "
            "became a signed event on Kafka (access.decisions.v1, accounts.events.v1, payments.events.v1)")

    def _balance(self, account_id: str) -> int:
        reply: Any = self.accounts.GetAccount(accounts_pb2.GetAccountRequest(account_id=account_id),
                                              metadata=self._as("sam"), timeout=20)
        return int(reply.account.balance_minor)
