"""The bank calls labs set their scene with (accounts of their own, opened and funded) and read the outcome
back with; a refusal here is a set-up failure, not a verdict."""

import uuid
from typing import Any

import grpc

from bastion.accounts.v1 import accounts_pb2, accounts_pb2_grpc
from bastion.labs.platform import TIMEOUT, LabSetupError, Session, new_correlation_id
from bastion.payments.v1 import payments_pb2, payments_pb2_grpc


class Bank:
    def __init__(self, session: Session, lab: str) -> None:
        self.session = session
        self.lab = lab
        self.accounts = accounts_pb2_grpc.AccountsStub(session.channel("accounts"))  # type: ignore[no-untyped-call]
        self.payments = payments_pb2_grpc.PaymentsStub(session.channel("payments"))  # type: ignore[no-untyped-call]

    def metadata(self, user: str, correlation_id: str = "") -> tuple[tuple[str, str], ...]:
        return self.session.as_user(user, correlation_id or new_correlation_id(self.lab))

    def _setup(self, step: str, call: Any) -> Any:
        try:
            return call()
        except grpc.RpcError as error:
            raise LabSetupError(f"{step} failed: {error.code().name}: {error.details()}") from None

    def open_account(self, owner: str, amount: int = 0, correlation_id: str = "", notification_email: str = "") -> str:
        """A new EUR account of OWNER (told at NOTIFICATION_EMAIL, if given), funded with AMOUNT minor units by tina
        the teller."""
        request = accounts_pb2.OpenAccountRequest(currency="EUR", notification_email=notification_email)
        reply = self._setup(f"{owner} opening an account", lambda: self.accounts.OpenAccount(
            request, metadata=self.metadata(owner, correlation_id), timeout=TIMEOUT))
        account_id = str(reply.account.account_id)
        if amount:
            self.deposit(account_id, amount, correlation_id)
        return account_id

    def deposit(self, account_id: str, amount: int, correlation_id: str = "") -> None:
        self._setup("tina's deposit", lambda: self.accounts.Deposit(accounts_pb2.DepositRequest(
            account_id=account_id, amount_minor=amount, idempotency_key=f"lab-{self.lab}-{uuid.uuid4()}"),
            metadata=self.metadata("tina", correlation_id), timeout=TIMEOUT))

    def balance(self, account_id: str) -> int:
        """The balance as sam from support sees it."""
        reply = self._setup("sam reading a balance", lambda: self.accounts.GetAccount(
            accounts_pb2.GetAccountRequest(account_id=account_id), metadata=self.metadata("sam"), timeout=TIMEOUT))
        return int(reply.account.balance_minor)

    def transfer_request(self, source: str, target: str, amount: int, key: str = "") -> Any:
        return payments_pb2.TransferRequest(idempotency_key=key or f"lab-{self.lab}-{uuid.uuid4()}",
                                            from_account_id=source, to_account_id=target, amount_minor=amount,
                                            currency="EUR")


def euros(minor: int) -> str:
    """MINOR units of EUR for people to read (integers throughout: money is never a float)."""
    whole, cents = divmod(abs(minor), 100)
    return f"{'-' if minor < 0 else ''}{whole:,}.{cents:02d} EUR"
