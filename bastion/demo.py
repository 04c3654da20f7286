"""The demo scenario: the bank at work on the running platform, each step narrated and checked."""

import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
from keycloak import KeycloakOpenID

from bastion.accounts.v1 import accounts_pb2, accounts_pb2_grpc
from bastion.audit.alerts import load_alert_rules
from bastion.audit.v1 import audit_pb2, audit_pb2_grpc
from bastion.devstack.components.keycloak import Keycloak
from bastion.devstack.context import StackContext
from bastion.devstack.errors import DevstackError
from bastion.grpc.channels import blocking_channel, call_metadata
from bastion.grpc.server import TlsFiles
from bastion.grpc.spans import milliseconds, recorded_spans
from bastion.notifications.v1 import notifications_pb2, notifications_pb2_grpc
from bastion.payments.v1 import payments_pb2, payments_pb2_grpc

NOTIFICATION_WAIT_SECONDS = 60
SPANS_WAIT_SECONDS = 15
TRANSFER_SPAN, APPLY_SPAN = "bastion.payments.v1.Payments/Transfer", "bastion.accounts.v1.Accounts/ApplyTransfer"
AUDIT_WAIT_SECONDS = 60
PROBING_RULE = "permission-probing"
COUNTED_ENTRIES = re.compile(r"audit log entries (\d+) to (\d+)")  # in an alert's notification text


class Scenario:
    def __init__(self, ctx: StackContext, say: Callable[[str], None]) -> None:
        self.ctx = ctx
        self.say = say
        cli = ctx.pki.paths("cli")
        tls = TlsFiles(cli.cert, cli.key, ctx.ca_file)

        def channel(service: str) -> grpc.Channel:
            return blocking_channel(ctx.grpc_address(service), tls, service)

        self.accounts = accounts_pb2_grpc.AccountsStub(channel("accounts"))  # type: ignore[no-untyped-call]
        self.payments = payments_pb2_grpc.PaymentsStub(channel("payments"))  # type: ignore[no-untyped-call]
        self.notifications = notifications_pb2_grpc.NotificationsStub(  # type: ignore[no-untyped-call]
            channel("notifications"))
        self.audit = audit_pb2_grpc.AuditStub(channel("audit"))  # type: ignore[no-untyped-call]
        keycloak = Keycloak(ctx)
        self.keycloak = KeycloakOpenID(server_url=keycloak.server_url, realm_name=keycloak.realm_name,
                                       client_id="bastion-cli", verify=str(ctx.ca_file))
        self.correlation_id = f"demo-{uuid.uuid4()}"
        self.tokens: dict[str, str] = {}

    def _as(self, user: str) -> tuple[tuple[str, str], ...]:
        """Each user signs in once: the scenario takes far less than a token's 5-minute lifetime."""
        if user not in self.tokens:
            self.tokens[user] = str(self.keycloak.token(user, self.ctx.credentials.users[user])["access_token"])
        return call_metadata(self.tokens[user], self.correlation_id)

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
        bob = self.accounts.OpenAccount(accounts_pb2.OpenAccountRequest(currency="EUR",
                                                                        notification_email="bob@example.com"),
                                        metadata=self._as("bob"), timeout=20).account
        say(f"1. alice and bob each opened a EUR account ({alice.account_id[:8]}…, {bob.account_id[:8]}…); bob's "
            "address for notifications left accounts sealed for the notifications service alone")
        self.accounts.Deposit(accounts_pb2.DepositRequest(account_id=alice.account_id, amount_minor=100_000,
                                                          idempotency_key=f"demo-deposit-{uuid.uuid4()}"),
                              metadata=self._as("tina"), timeout=20)
        say("2. tina the teller deposited 1,000.00 EUR into alice's account")
        request = payments_pb2.TransferRequest(idempotency_key=f"demo-transfer-{uuid.uuid4()}",
                                               from_account_id=alice.account_id, to_account_id=bob.account_id,
                                               amount_minor=25_000, currency="EUR")
        # The scenario starts this call's trace and samples it, so payments and accounts record their spans.
        trace_id = uuid.uuid4().hex
        traceparent = ("traceparent", f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01")
        payment = self.payments.Transfer(request, metadata=(*self._as("alice"), traceparent), timeout=30).payment
        again = self.payments.Transfer(request, metadata=self._as("alice"), timeout=30).payment
        if payment.status != "COMPLETED" or again.payment_id != payment.payment_id:
            raise DevstackError(f"alice's payment ended {payment.status}, and sent again with its key it answered "
                                f"payment {again.payment_id} for {payment.payment_id}",
                                "see the payments service log")
        say(f"3. alice sent 250.00 EUR to bob: payment {payment.status}; sent again with the same idempotency "
            "key, the answer is the same payment and no second debit")
        try:
            self.accounts.GetAccount(accounts_pb2.GetAccountRequest(account_id=alice.account_id),
                                     metadata=self._as("bob"), timeout=20)
            raise DevstackError("bob could read alice's account", "this is a security bug: report it")
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise  # not the ownership check answering: the scenario failed, and says how
            say(f"4. bob tried to read alice's account: {error.code().name} (he cannot even learn it exists)")
        balances = {name: self._balance(account.account_id) for name, account in (("alice", alice), ("bob", bob))}
        if balances != {"alice": 75_000, "bob": 25_000}:
            raise DevstackError(f"unexpected balances {balances}", "see the accounts service log")
        say("5. balances checked by sam (support): alice 750.00 EUR, bob 250.00 EUR; money is conserved")
        say(f"6. bob's notification arrived through StreamNotifications: \"{self._bobs_notification(bob.account_id)}\"")
        recorded = self._audited(payment.payment_id)
        verdict = self.audit.VerifyChain(audit_pb2.VerifyChainRequest(), metadata=self._as("ada"), timeout=60)
        if not verdict.ok:
            raise DevstackError(f"the audit chain does not verify: {verdict.reason}", "run `bastion audit verify`")
        anchored = (f"the newest signed checkpoint covers {verdict.checkpoint_length}" if verdict.checkpoint_length
                    else "no checkpoint signed yet: the first comes within seconds of the first records")
        say(f"7. ada (auditor) found the payment in the audit log ({recorded}) and verified the whole chain: "
            f"{verdict.length} records, head {verdict.head_hash.hex()[:16]}…; {anchored}")
        say(f"8. {self._probe(alice.account_id, verdict.length)}")
        say(f"9. {self._traced(trace_id)}")
        say(f"every call carried the correlation id {self.correlation_id}; every access decision and state change "
            "became a signed event on Kafka (access.decisions.v1, accounts.events.v1, payments.events.v1), and the "
            "alert too (security.alerts.v1)")

    def _traced(self, trace_id: str) -> str:
        """The transfer's trace as the services recorded it: payments' call, its call to accounts (a client span)
        and accounts' call, its child, and the way of the events each caused, children of the calls that caused
        them: their producers' relays publishing them, notifications processing them, the audit service logging
        them."""
        deadline = time.monotonic() + SPANS_WAIT_SECONDS
        while True:
            spans = recorded_spans(self.ctx.layout.log_dir, ("payments", "accounts", "notifications", "audit"),
                                   trace_id)
            transfer, calling, applied = (span_named(spans, name, kind) for name, kind in (
                (TRANSFER_SPAN, "SpanKind.SERVER"), (APPLY_SPAN, "SpanKind.CLIENT"), (APPLY_SPAN, "SpanKind.SERVER")))
            sent, processed, logged = (events_of([span for span in spans if span.get("kind") == kind
                                                  and service_of(span) in services])
                                       for kind, services in (("SpanKind.PRODUCER", ("payments", "accounts")),
                                                              ("SpanKind.CONSUMER", ("notifications",)),
                                                              ("SpanKind.CONSUMER", ("audit",))))
            if (None not in (transfer, calling, applied) and len(processed) >= 2 and len(sent) >= 2
                    and logged == sent) or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        callers = {span["context"].get("span_id") for span in (transfer, applied) if span is not None}
        followers = [span for span in spans if span.get("kind") in ("SpanKind.PRODUCER", "SpanKind.CONSUMER")]
        if (transfer is None or calling is None or applied is None
                or calling.get("parent_id") != transfer["context"].get("span_id")
                or applied.get("parent_id") != calling["context"].get("span_id")
                or len(processed) < 2 or len(sent) < 2 or logged != sent
                or any(span.get("parent_id") not in callers for span in followers)):
            raise DevstackError(f"the transfer's trace {trace_id} was not recorded as one tree in the services' "
                                f"span files ({self.ctx.layout.log_dir}/*.spans.jsonl)",
                                "see the services' logs; spans are written about a second after they end")
        attempts = (calling.get("attributes") or {}).get("bastion.attempts", "?")
        return (f"the transfer's trace {trace_id[:8]}… was recorded as one tree of spans: payments Transfer "
                f"({milliseconds(transfer):.1f} ms) → its call to accounts ({milliseconds(calling):.1f} ms, "
                f"attempts: {attempts}) → accounts ApplyTransfer "
                f"({milliseconds(applied):.1f} ms); the {len(sent)} events they caused, each a child of its cause "
                f"(the events carry it, signed): published by their outbox relays, {len(processed)} processed by "
                f"notifications, all {len(logged)} logged by the audit service; in logs/*.spans.jsonl of the state "
                "folder")

    def _probe(self, account_id: str, log_length: int) -> str:
        """bob tries a teller's method as often as the permission-probing rule allows; ada is told of an alert
        raised by a refusal after LOG_LENGTH (so by this run's probes, not an earlier one)."""
        rules = {rule.name: rule for rule in load_alert_rules(self.ctx.settings.infra_dir / "alert-rules.yaml")}
        rule = rules.get(PROBING_RULE)
        if rule is None:
            return f"(skipped: infra/alert-rules.yaml has no {PROBING_RULE} rule)"
        seen = self._last_notification("ada")
        for _ in range(rule.threshold):
            try:
                self.accounts.Deposit(accounts_pb2.DepositRequest(account_id=account_id, amount_minor=10**6,
                                                                  idempotency_key=f"demo-probe-{uuid.uuid4()}"),
                                      metadata=self._as("bob"), timeout=20)
                raise DevstackError("bob, a customer, could deposit money", "this is a security bug: report it")
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.PERMISSION_DENIED:
                    raise

        def about_this_run(notification: Any) -> bool:
            counted = COUNTED_ENTRIES.search(notification.text)
            return (notification.kind == "security_alert" and f"{PROBING_RULE}: principal 'bob'" in notification.text
                    and counted is not None and int(counted.group(2)) > log_length)  # raised by this run's probes

        told = self._notified("ada", seen, about_this_run)
        return (f"bob tried a teller's method (Deposit) {rule.threshold} times: PERMISSION_DENIED; the audit "
                f"service raised a signed {PROBING_RULE} alert and ada (auditor) was told: \"{told}\"")

    def _last_notification(self, user: str) -> int:
        after = 0
        while True:
            page = self.notifications.ListNotifications(
                notifications_pb2.ListNotificationsRequest(after_sequence=after, limit=500),
                metadata=self._as(user), timeout=20).notifications
            if page:
                after = page[-1].sequence
            if len(page) < 500:
                return after

    def _notified(self, user: str, after: int, wanted: Callable[[Any], bool]) -> str:
        """The text of USER's first notification after AFTER that is WANTED, from their stream."""
        stream = self.notifications.StreamNotifications(
            notifications_pb2.StreamNotificationsRequest(after_sequence=after), metadata=self._as(user),
            timeout=NOTIFICATION_WAIT_SECONDS)
        try:
            for reply in stream:
                if wanted(reply.notification):
                    return str(reply.notification.text)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
        finally:
            stream.cancel()
        raise DevstackError(f"{user}'s notification did not arrive within {NOTIFICATION_WAIT_SECONDS}s",
                            "see the audit and notifications service logs in the state folder")

    def _bobs_notification(self, account_id: str) -> str:
        """The notification of the transfer into ACCOUNT_ID, from bob's stream (his backlog first)."""
        return self._notified("bob", 0, lambda n: n.kind == "transfer_received" and account_id in n.text)

    def _audited(self, payment_id: str) -> str:
        """The payment's event as the audit service recorded it (it consumes asynchronously: wait a little)."""
        deadline = time.monotonic() + AUDIT_WAIT_SECONDS
        while time.monotonic() < deadline:
            found = self.audit.ListEvents(audit_pb2.ListEventsRequest(aggregate_id=payment_id),
                                          metadata=self._as("ada"), timeout=20).events
            if found:
                return f"seq {found[0].seq}, {found[0].event_type.rsplit('.', 1)[-1]}"
            time.sleep(0.5)
        raise DevstackError(f"the payment was not in the audit log after {AUDIT_WAIT_SECONDS}s",
                            "see the audit service log in the state folder")

    def _balance(self, account_id: str) -> int:
        reply: Any = self.accounts.GetAccount(accounts_pb2.GetAccountRequest(account_id=account_id),
                                              metadata=self._as("sam"), timeout=20)
        return int(reply.account.balance_minor)


def service_of(span: dict[str, Any]) -> object:
    return ((span.get("resource") or {}).get("attributes") or {}).get("service.name")


def events_of(spans: list[dict[str, Any]]) -> set[object]:
    """The events SPANS are about (a retried one may have several spans)."""
    return {(span.get("attributes") or {}).get("bastion.event_id") for span in spans}


def span_named(spans: list[dict[str, Any]], name: str, kind: str) -> dict[str, Any] | None:
    """The span of SPANS with NAME and KIND (`SpanKind.SERVER`, ...; a call and the client span of the call made to
    it share a name) that answered OK, else the first: a retried call leaves a span per attempt."""
    named = [span for span in spans if span.get("name") == name and span.get("kind") == kind]
    answered = [span for span in named if (span.get("attributes") or {}).get("rpc.grpc.status_code") == 0]
    return next(iter(answered or named), None)
