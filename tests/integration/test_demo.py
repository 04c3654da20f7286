"""`bastion demo` on the test stack: every step of the scenario reported, with no error."""

from typing import Any

from tests.integration.conftest import bastion


def test_demo_runs_the_scenario_end_to_end(stack: Any) -> None:
    result = bastion("demo", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    output = " ".join(result.stdout.split())
    for step in ("1. alice and bob each opened", "2. tina the teller deposited", "3. alice sent 250.00 EUR",
                 "payment COMPLETED", "4. bob tried to read alice's account: NOT_FOUND", "money is conserved",
                 "6. bob's notification arrived through StreamNotifications", "250.00 EUR arrived in your account",
                 "7. ada (auditor) found the payment in the audit log", "PaymentCompleted", "verified the whole chain",
                 "8. bob tried a teller's method (Deposit) 5 times: PERMISSION_DENIED",
                 "permission-probing alert and ada (auditor) was told", "Security alert (warning) permission-probing: "
                 "principal 'bob' refused 5 times", "9. the transfer's trace",
                 "was recorded as one tree of spans: payments Transfer",
                 "events they caused, each a child of its cause (the events carry it, signed): published by their "
                 "outbox relays", "processed by notifications, all", "logged by the audit service"):
        assert step in output, step
