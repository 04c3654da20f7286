"""Helpers for tests of the bank as `bastion up` runs it: stubs over mutual TLS with the CLI's certificate,
calls as a demo user, funded accounts, and the signed events the services published."""

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from confluent_kafka import Consumer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bastion.accounts.v1 import accounts_pb2, accounts_pb2_grpc
from bastion.devstack.components.kafka import Kafka
from bastion.devstack.context import StackContext
from bastion.devstack.event_access import load_policy
from bastion.events.errors import VerificationError
from bastion.events.keys import KeyRing
from bastion.events.trust import load_trust_policy
from bastion.events.verify import EnvelopeVerifier, VerifiedEvent, is_bundle
from bastion.grpc.channels import blocking_channel, call_metadata
from bastion.notifications.v1 import notifications_pb2_grpc
from bastion.payments.v1 import payments_pb2_grpc
from tests.integration.grpc_harness import tls_of, user_token

TOKEN_REUSE_SECONDS = 60.0  # well within the realm's 5-minute access token lifespan
SIGN_IN = threading.Lock()


@dataclass
class Bank:
    ctx: StackContext
    accounts: Any
    payments: Any
    notifications: Any
    # One sign-in per user and minute: Keycloak's brute-force detection counts quick repeated logins as failures.
    tokens: dict[str, tuple[float, str]] = field(default_factory=dict)

    @classmethod
    def connect(cls, ctx: StackContext) -> "Bank":
        return cls(ctx, accounts_pb2_grpc.AccountsStub(channel(ctx, "accounts")),  # type: ignore[no-untyped-call]
                   payments_pb2_grpc.PaymentsStub(channel(ctx, "payments")),  # type: ignore[no-untyped-call]
                   notifications_pb2_grpc.NotificationsStub(  # type: ignore[no-untyped-call]
                       channel(ctx, "notifications")))

    def token(self, user: str) -> str:
        with SIGN_IN:
            fetched_at, token = self.tokens.get(user, (0.0, ""))
            if time.monotonic() - fetched_at > TOKEN_REUSE_SECONDS:
                fetched_at, token = time.monotonic(), str(user_token(self.ctx, user)["access_token"])
                self.tokens[user] = (fetched_at, token)
            return token

    def as_user(self, user: str, correlation_id: str = "") -> tuple[tuple[str, str], ...]:
        return call_metadata(self.token(user), correlation_id or f"it-{uuid.uuid4()}")

    def open_account(self, owner: str, amount: int = 0, currency: str = "EUR", correlation_id: str = "",
                     notification_email: str = "") -> str:
        request = accounts_pb2.OpenAccountRequest(currency=currency, notification_email=notification_email)
        account_id = str(self.accounts.OpenAccount(request,
                                                   metadata=self.as_user(owner, correlation_id),
                                                   timeout=10).account.account_id)
        if amount:
            self.deposit(account_id, amount, correlation_id)
        return account_id

    def deposit(self, account_id: str, amount: int, correlation_id: str = "") -> None:
        self.accounts.Deposit(accounts_pb2.DepositRequest(account_id=account_id, amount_minor=amount,
                                                          idempotency_key=f"fund-{uuid.uuid4()}"),
                              metadata=self.as_user("tina", correlation_id), timeout=10)

    def account(self, account_id: str) -> Any:
        return self.accounts.GetAccount(accounts_pb2.GetAccountRequest(account_id=account_id),
                                        metadata=self.as_user("sam"), timeout=10).account

    def accounts_of(self, user: str) -> list[Any]:
        """Every account USER is shown, page after page."""
        shown, token = [], ""
        while True:
            page = self.accounts.ListAccounts(accounts_pb2.ListAccountsRequest(page_size=500, page_token=token),
                                              metadata=self.as_user(user), timeout=10)
            shown += list(page.accounts)
            token = page.next_page_token
            if not token:
                return shown

    def balance(self, account_id: str) -> int:
        return int(self.account(account_id).balance_minor)


def channel(ctx: StackContext, service: str) -> grpc.Channel:
    return blocking_channel(ctx.grpc_address(service), tls_of(ctx, "cli"), service)


def health_of(ctx: StackContext, service: str) -> int:
    with channel(ctx, service) as to_service:
        stub = health_pb2_grpc.HealthStub(to_service)  # type: ignore[no-untyped-call]
        status: int = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        return status


def wait_for_health(ctx: StackContext, service: str, wanted: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (status := health_of(ctx, service)) != wanted:
        assert time.monotonic() < deadline, f"{service} still {status}, not {wanted}"
        time.sleep(0.5)


def signed_events(ctx: StackContext, topics: list[str], wanted: Callable[[VerifiedEvent], bool], count: int,
                  timeout: float = 60) -> list[VerifiedEvent]:
    """Read TOPICS from the start as the Kafka admin and pass every record through the consumer pipeline's
    checks (signature, producer key, trust policy): the verified events WANTED picks, once COUNT are found."""
    infra = ctx.settings.infra_dir
    ring = KeyRing(ctx.layout.event_keys_dir)
    verifier = EnvelopeVerifier(ring.trust_store(), load_trust_policy(
        infra / "event-trust.yaml", load_policy(infra / "event-access.yaml", set(ctx.service_names))))
    reader = Consumer({**Kafka(ctx).client_config("admin", ctx.credentials.kafka["admin"]),
                       "group.id": f"it-reader-{uuid.uuid4()}", "auto.offset.reset": "earliest"})
    reader.subscribe(topics)
    found: list[VerifiedEvent] = []
    deadline = time.monotonic() + timeout
    try:
        while len(found) < count and time.monotonic() < deadline:
            message = reader.poll(1)
            if message is None or message.error() is not None:
                continue
            try:
                if is_bundle(message.headers()):  # the relay's records: a bundle of envelopes each
                    events = [event for event in verifier.verify_bundle(
                        message.value(), message.topic(), check_freshness=False).outcomes
                        if isinstance(event, VerifiedEvent)]
                else:
                    events = [verifier.verify(message.value(), message.topic(), check_freshness=False)]
            except VerificationError:  # e.g. signed with a key another test retired: never one of ours
                continue
            found.extend(event for event in events if wanted(event))
    finally:
        reader.close()
    return found
