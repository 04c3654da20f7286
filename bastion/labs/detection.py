"""The detection lab: a customer probing for a teller's method, call after call. Each call is denied, and the
audit service, which sees every denial, raises a signed security alert that counts them."""

import time
import uuid
from collections.abc import Iterator
from functools import partial

import grpc
from sqlalchemy import select

from bastion.access.v1.decision_pb2 import SecurityAlert
from bastion.accounts.v1 import accounts_pb2
from bastion.audit.alerts import ALERTING_SERVICE, AlertRule, alert_in, load_alert_rules
from bastion.audit.postgres import log as audit_log
from bastion.audit.records import RecordKind
from bastion.labs.bank import Bank
from bastion.labs.base import Evidence
from bastion.labs.platform import TIMEOUT, LabSetupError, Session, answer, new_correlation_id

LAB = "permission-probing"
RULE = "permission-probing"
PROBER = "alice"


def _rule(session: Session) -> AlertRule:
    rules = {rule.name: rule for rule in load_alert_rules(session.ctx.settings.infra_dir / "alert-rules.yaml")}
    if RULE not in rules:
        raise LabSetupError(f"infra/alert-rules.yaml has no rule {RULE!r} for this lab to trip")
    return rules[RULE]


def permission_probing(session: Session) -> Iterator[Evidence]:
    rule = _rule(session)
    bank = Bank(session, LAB)
    account = bank.open_account(PROBER)
    yield Evidence(f"{PROBER} opens an account of her own (calibration)", f"OK: {account}")
    watch = session.watch()
    probes = [new_correlation_id(LAB) for _ in range(rule.threshold)]
    denied = 0
    for correlation_id in probes:
        request = accounts_pb2.DepositRequest(account_id=account, amount_minor=10**6,
                                              idempotency_key=f"lab-{LAB}-{uuid.uuid4()}")
        result = answer(partial(bank.accounts.Deposit, request, metadata=bank.metadata(PROBER, correlation_id),
                                timeout=TIMEOUT))
        if result.ok:
            yield Evidence(f"{PROBER}, a customer, calls accounts.Deposit (tellers only)", "OK: she deposited", False)
            return
        denied += result.code == grpc.StatusCode.PERMISSION_DENIED
    yield Evidence(f"{PROBER}, a customer, calls accounts.Deposit (tellers only) {len(probes)} times within seconds",
                   f"{denied} PERMISSION_DENIED")
    found = _alert(session, watch.audit_after, set(probes))
    if found is None:
        yield Evidence(f"a {RULE} alert counting these denials in the audit log",
                       f"none within {session.target.verdict_wait_seconds:g}s: the probing went unnoticed", False)
        return
    seq, producer, alert = found
    yield Evidence("the audit service's alert, signed and back in the audit log",
                   f"seq {seq} from {producer}: {alert.severity} {alert.rule}: {alert.counted_by} {alert.key!r} "
                   f"refused {alert.count} times within {alert.window_seconds}s (log entries {alert.first_seq} to "
                   f"{alert.last_seq})", alert.key == PROBER)
    for line in watch.log_lines("audit", "security_alert", alert.last_correlation_id)[:1]:
        yield Evidence("audit.log", line)


def _alert(session: Session, after: int, probes: set[str]) -> tuple[int, str, SecurityAlert] | None:
    """The alert of RULE raised by one of PROBES (the rule counts afresh after each alert, so one of the probes
    crosses its threshold), waiting for the audit service to record it."""
    # Accepted events of the audit service only: a refused event claiming to be an alert keeps its claimed type.
    query = (select(audit_log.c.seq, audit_log.c.producer, audit_log.c.envelope)
             .where(audit_log.c.seq > after, audit_log.c.event_type == SecurityAlert.DESCRIPTOR.full_name,
                    audit_log.c.kind == RecordKind.EVENT.value, audit_log.c.producer == ALERTING_SERVICE)
             .order_by(audit_log.c.seq))
    deadline = time.monotonic() + session.target.verdict_wait_seconds
    while True:
        with session.audit_engine().connect() as conn:
            for seq, producer, envelope in conn.execute(query):
                alert = alert_in(envelope)
                if alert.rule == RULE and alert.last_correlation_id in probes:
                    return seq, producer, alert
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.5)
