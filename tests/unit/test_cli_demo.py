"""`bastion demo`'s scenario on a stand-in platform: each step is narrated only once checked, and a step whose
check fails ends the demo with the reason instead of a tick (bastion/demo.py)."""

import itertools
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from bastion import demo
from bastion.demo import Scenario
from bastion.devstack.errors import DevstackError
from bastion.settings import PROJECT_ROOT
from tests.unit.labs.fakes import RpcError

USERS = ("alice", "bob", "tina", "sam", "ada")


def caller(metadata: tuple[tuple[str, str], ...]) -> str:
    return dict(metadata)["authorization"].removeprefix("Bearer ")


class Platform:
    """The four services as the demo sees them, each behaviour a switch a test turns."""

    def __init__(self) -> None:
        self.balances: dict[str, int] = {}
        self.payments: dict[str, Any] = {}
        self.ids = itertools.count(1)
        self.bob_reads: grpc.StatusCode | None = grpc.StatusCode.NOT_FOUND  # None: bob reads alice's account
        self.bob_deposits: grpc.StatusCode | None = grpc.StatusCode.PERMISSION_DENIED
        self.replay_is_new_payment = False
        self.chain_ok = True
        self.audited = True
        self.alert_told = True
        self.accounts, self.notifications, self.audit = self, self, self

    # accounts
    def OpenAccount(self, request: Any, metadata: Any, timeout: float) -> Any:
        account_id = f"{caller(metadata)}-{next(self.ids):08d}"
        self.balances[account_id] = 0
        return SimpleNamespace(account=SimpleNamespace(account_id=account_id))

    def Deposit(self, request: Any, metadata: Any, timeout: float) -> Any:
        if caller(metadata) == "bob" and self.bob_deposits is not None:
            raise RpcError(self.bob_deposits, "customers may not deposit")
        self.balances[request.account_id] += request.amount_minor
        return SimpleNamespace()

    def GetAccount(self, request: Any, metadata: Any, timeout: float) -> Any:
        if caller(metadata) == "bob" and not request.account_id.startswith("bob") and self.bob_reads is not None:
            raise RpcError(self.bob_reads, "account not found")
        return SimpleNamespace(account=SimpleNamespace(balance_minor=self.balances[request.account_id]))

    # payments
    def Transfer(self, request: Any, metadata: Any, timeout: float) -> Any:
        if request.idempotency_key not in self.payments or self.replay_is_new_payment:
            self.balances[request.from_account_id] -= request.amount_minor if not self.payments else 0
            self.balances[request.to_account_id] += request.amount_minor if not self.payments else 0
            self.payments[request.idempotency_key] = SimpleNamespace(payment_id=f"pay-{next(self.ids)}",
                                                                     status="COMPLETED")
        return SimpleNamespace(payment=self.payments[request.idempotency_key])

    # notifications
    def ListNotifications(self, request: Any, metadata: Any, timeout: float) -> Any:
        return SimpleNamespace(notifications=[])

    def StreamNotifications(self, request: Any, metadata: Any, timeout: float) -> Any:
        user = caller(metadata)
        if user == "bob":
            texts = [("transfer_received", f"250.00 EUR arrived in your account {account}")
                     for account in self.balances if account.startswith("bob")]
        elif self.alert_told:
            texts = [("security_alert", "Security alert (warning) permission-probing: principal 'bob' refused 5 "
                      "time(s) (audit log entries 90 to 94)")]
        else:
            texts = []
        return Stream([SimpleNamespace(notification=SimpleNamespace(kind=kind, text=text)) for kind, text in texts])

    # audit
    def ListEvents(self, request: Any, metadata: Any, timeout: float) -> Any:
        found = [SimpleNamespace(seq=42, event_type="bastion.payments.v1.PaymentCompleted")] if self.audited else []
        return SimpleNamespace(events=found)

    def VerifyChain(self, request: Any, metadata: Any, timeout: float) -> Any:
        return SimpleNamespace(ok=self.chain_ok, reason="" if self.chain_ok else "record 3 does not chain",
                               length=60, head_hash=b"\x01" * 32, checkpoint_length=50)


class Stream:
    """A server stream that ends at its deadline once it has sent everything."""

    def __init__(self, replies: list[Any]) -> None:
        self.replies = replies

    def __iter__(self) -> Iterator[Any]:
        yield from self.replies
        raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline")

    def cancel(self) -> None:
        pass


@pytest.fixture()
def platform() -> Platform:
    return Platform()


def scenario(platform: Platform, said: list[str], monkeypatch: pytest.MonkeyPatch) -> Scenario:
    """The demo's scenario on PLATFORM, its narration into SAID; the span files are not read (no services)."""
    monkeypatch.setattr(demo, "NOTIFICATION_WAIT_SECONDS", 0)
    monkeypatch.setattr(demo, "AUDIT_WAIT_SECONDS", 0.2)
    monkeypatch.setattr(Scenario, "_traced", lambda self, trace_id: "the transfer's trace (not read here)")
    played: Any = Scenario.__new__(Scenario)
    played.ctx = SimpleNamespace(settings=SimpleNamespace(infra_dir=PROJECT_ROOT / "infra"))
    played.say = said.append
    played.accounts = played.payments = played.notifications = played.audit = platform
    played.correlation_id = "demo-test"
    played.tokens = {user: user for user in USERS}
    return played  # type: ignore[no-any-return]


def test_every_step_is_narrated_when_every_check_passes(platform: Platform, monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []
    scenario(platform, said, monkeypatch).run()
    assert [line.split(".", 1)[0] for line in said[:9]] == [str(step) for step in range(1, 10)]
    assert "4. bob tried to read alice's account: NOT_FOUND" in said[3]
    assert "the answer is the same payment and no second debit" in said[2]
    assert "ada (auditor) was told" in said[7]


@pytest.mark.parametrize(("switch", "value", "reason"), [
    ("bob_reads", None, "bob could read alice's account"),
    ("bob_deposits", None, "bob, a customer, could deposit money"),
    ("chain_ok", False, "the audit chain does not verify: record 3 does not chain"),
    ("audited", False, "the payment was not in the audit log"),
    ("alert_told", False, "ada's notification did not arrive"),
], ids=["bob-reads", "bob-deposits", "chain-broken", "not-audited", "ada-not-told"])
def test_a_check_that_fails_ends_the_demo_with_its_reason(
    switch: str, value: Any, reason: str, platform: Platform, monkeypatch: pytest.MonkeyPatch,
) -> None:
    setattr(platform, switch, value)
    said: list[str] = []
    with pytest.raises(DevstackError, match=reason):
        scenario(platform, said, monkeypatch).run()


def test_balances_that_do_not_add_up_end_the_demo(platform: Platform, monkeypatch: pytest.MonkeyPatch) -> None:
    original = platform.Transfer

    def debit_twice(request: Any, metadata: Any, timeout: float) -> Any:
        platform.balances[request.from_account_id] -= request.amount_minor
        return original(request, metadata, timeout)

    platform.Transfer = debit_twice  # type: ignore[method-assign]
    said: list[str] = []
    with pytest.raises(DevstackError, match="unexpected balances"):
        scenario(platform, said, monkeypatch).run()
    assert not any(line.startswith("5.") for line in said)


def test_a_probe_refused_for_another_reason_than_permission_ends_the_demo_as_a_failed_call(
    platform: Platform, monkeypatch: pytest.MonkeyPatch,
) -> None:
    platform.bob_deposits = grpc.StatusCode.UNAVAILABLE
    said: list[str] = []
    with pytest.raises(DevstackError, match="the demo scenario failed: UNAVAILABLE"):
        scenario(platform, said, monkeypatch).run()
    assert not any(line.startswith("8.") for line in said)
