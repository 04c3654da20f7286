"""The detection labs, where the attack is noticed and raised as a signed security alert by the audit service: a
customer probing for a teller's method, call after call (each call denied, the denials counted); an event withheld
in transit (the next one held back behind the gap, the gap reported once it stays open)."""

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import grpc
from sqlalchemy import select

from bastion.access.v1.decision_pb2 import SecurityAlert
from bastion.accounts.v1 import accounts_pb2
from bastion.audit.alert_recipients import load_alert_recipients
from bastion.audit.alerts import ALERTING_SERVICE, AlertRule, alert_in, how_often, load_alert_rules
from bastion.audit.postgres import log as audit_log
from bastion.audit.records import RecordKind
from bastion.events.errors import RejectReason
from bastion.labs.bank import Bank
from bastion.labs.base import Evidence
from bastion.labs.events import ACCOUNTS_TOPIC, NOTIFICATIONS_PAGE, forged_deposit
from bastion.labs.platform import TIMEOUT, LabSetupError, Session, answer, new_correlation_id
from bastion.notifications.v1 import notifications_pb2, notifications_pb2_grpc

LAB = "permission-probing"
RULE = "permission-probing"
PROBER = "alice"
GAP_LAB = "suppressed-event"
GAP_RULE = "sequence-gaps"


def _rule(session: Session, name: str) -> AlertRule:
    rules = {rule.name: rule for rule in load_alert_rules(session.ctx.settings.infra_dir / "alert-rules.yaml")}
    if name not in rules:
        raise LabSetupError(f"infra/alert-rules.yaml has no rule {name!r} for this lab to trip")
    return rules[name]


def permission_probing(session: Session) -> Iterator[Evidence]:
    rule = _rule(session, RULE)
    bank = Bank(session, LAB)
    account = bank.open_account(PROBER)
    yield Evidence(f"{PROBER} opens an account of her own (calibration)", f"OK: {account}")
    watch = session.watch()
    probes = [new_correlation_id(LAB) for _ in range(rule.threshold)]
    denied, other = 0, []
    for correlation_id in probes:
        request = accounts_pb2.DepositRequest(account_id=account, amount_minor=10**6,
                                              idempotency_key=f"lab-{LAB}-{uuid.uuid4()}")
        result = answer(partial(bank.accounts.Deposit, request, metadata=bank.metadata(PROBER, correlation_id),
                                timeout=TIMEOUT))
        if result.ok:
            yield Evidence(f"{PROBER}, a customer, calls accounts.Deposit (tellers only)", "OK: she deposited", False)
            return
        if result.code == grpc.StatusCode.PERMISSION_DENIED:
            denied += 1
        else:
            other.append(str(result))
    if other:
        # The rule counts denials: with fewer than its threshold, no alert says nothing about the detection.
        raise LabSetupError(f"only {denied} of {len(probes)} calls were denied by the policy (others: {other[0]}): "
                            "the lab cannot tell")
    yield Evidence(f"{PROBER}, a customer, calls accounts.Deposit (tellers only) {len(probes)} times within seconds",
                   f"{denied} PERMISSION_DENIED")
    found = _alert(session, watch.audit_after, RULE, set(probes), session.target.verdict_wait_seconds)
    if found is None:
        yield Evidence(f"a {RULE} alert counting these denials in the audit log",
                       f"none within {session.target.verdict_wait_seconds:g}s: the probing went unnoticed", False)
        return
    seq, producer, alert = found.seq, found.producer, found.alert
    yield Evidence("the audit service's alert, signed and back in the audit log",
                   f"seq {seq} from {producer}: {alert.severity} {alert.rule}: {alert.counted_by} {alert.key!r} "
                   f"refused {how_often(alert.count)} within {alert.window_seconds}s (log entries {alert.first_seq} to "
                   f"{alert.last_seq})", alert.key == PROBER)
    for line in watch.log_lines("audit", "security_alert", alert.last_correlation_id)[:1]:
        yield Evidence("audit.log", line)
    yield from _recipients_told(session, found)


def suppressed_event(session: Session) -> Iterator[Evidence]:
    """Event 1 of a fresh account never reaches the topic (withheld in transit); event 2, genuine and signed, does.
    Each verifying consumer of the topic must hold 2 back rather than apply it out of order, and report the gap
    once it stays open; the audit service turns the report into a signed alert."""
    _rule(session, GAP_RULE)
    route = session.target.event_routes[ACCOUNTS_TOPIC]
    # The audit service keeps every event it is given and applies none, so it has no order to keep.
    holders = [consumer for consumer in route.consumers if consumer != ALERTING_SERVICE]
    if not holders:
        raise LabSetupError(f"{route.topic} has no verifying consumer that applies its events")
    correlation_id = new_correlation_id(GAP_LAB)
    second = forged_deposit(session, "accounts", ACCOUNTS_TOPIC, 100, correlation_id, sequence=2)
    yield Evidence("the stream", f"event 1 of account {second.aggregate_id[:8]}… withheld in transit; event 2, a "
                   "MoneyDeposited genuinely signed by accounts, let through")
    watch = session.watch()
    delivery = session.publish("accounts", route.topic, second.SerializeToString(), key=second.aggregate_id.encode())
    if delivery.error is not None:
        raise LabSetupError(f"accounts could not write to {route.topic}: {delivery.error.str()}")
    yield Evidence("published", f"event 2 to {route.topic} at {delivery.source}, as Kafka principal accounts")
    verdict_wait = session.target.verdict_wait_seconds
    for consumer in holders:
        held = watch.log_lines(consumer, "event_held_behind_sequence_gap", correlation_id, wait_seconds=verdict_wait)
        yield Evidence(f"{consumer} holds event 2 back", held[0] if held else
                       f"no event_held_behind_sequence_gap line within {verdict_wait:g}s", bool(held))
    gap_wait = session.ctx.settings.sequence_gap_alert_seconds  # as the services were started with (same settings)
    for consumer in holders:
        reported = watch.log_lines(consumer, "sequence_gap_open", correlation_id, wait_seconds=gap_wait + verdict_wait)
        yield Evidence(f"{consumer} reports the gap, still open after {gap_wait:g}s", reported[0] if reported else
                       f"no sequence_gap_open line within {gap_wait + verdict_wait:g}s: the gap went unnoticed",
                       bool(reported))
    records = [entry for entry in watch.audit_entries(correlation_id, count=len(holders),
                                                      kind=RecordKind.REJECTION.value)
               if entry.reason == RejectReason.SEQUENCE_GAP.value]
    yield Evidence("the gap reports in the audit trail", "; ".join(str(entry) for entry in records) or
                   "no sequence_gap record", len(records) == len(holders))
    found = _alert(session, watch.audit_after, GAP_RULE, {correlation_id}, verdict_wait)
    if found is None:
        yield Evidence(f"a {GAP_RULE} alert in the audit log", f"none within {verdict_wait:g}s", False)
        return
    seq, producer, alert = found.seq, found.producer, found.alert
    yield Evidence("the audit service's alert, signed and back in the audit log",
                   f"seq {seq} from {producer}: {alert.severity} {alert.rule}: {alert.counted_by} {alert.key!r}",
                   alert.key in holders)
    yield from _recipients_told(session, found)


def _recipients_told(session: Session, found: "FoundAlert") -> Iterator[Evidence]:
    """Each person of infra/alert-recipients.yaml is told of the alert FOUND, on their own notification stream (the
    notification carries the id of the signed alert it came from)."""
    stub = notifications_pb2_grpc.NotificationsStub(session.channel("notifications"))  # type: ignore[no-untyped-call]
    wait = session.target.verdict_wait_seconds
    for recipient in load_alert_recipients(session.ctx.settings.infra_dir / "alert-recipients.yaml"):
        deadline, after, told = time.monotonic() + wait, 0, None
        while True:
            told, after = _told(session, stub, recipient, found.event_id, after)
            if told is not None or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        yield Evidence(f"{recipient}'s notifications (infra/alert-recipients.yaml)",
                       told or f"no notification of alert {found.event_id} within {wait:g}s", told is not None)


def _told(session: Session, stub: notifications_pb2_grpc.NotificationsStub, recipient: str, event_id: str,
          after: int) -> tuple[str | None, int]:
    """The text of RECIPIENT's notification from EVENT_ID among those after AFTER, if there is one yet, and the
    last sequence read (where to go on from)."""
    while True:
        page = stub.ListNotifications(
            notifications_pb2.ListNotificationsRequest(after_sequence=after, limit=NOTIFICATIONS_PAGE),
            metadata=session.as_user(recipient, new_correlation_id("alert-recipient")), timeout=TIMEOUT).notifications
        for notification in page:
            if notification.event_id == event_id:
                return str(notification.text), after
        if page:
            after = page[-1].sequence
        if len(page) < NOTIFICATIONS_PAGE:
            return None, after


@dataclass(frozen=True)
class FoundAlert:
    """An alert of the audit service, as the audit log keeps it."""

    seq: int
    producer: str
    event_id: str
    alert: SecurityAlert


def _alert(session: Session, after: int, rule: str, correlation_ids: set[str], wait: float) -> FoundAlert | None:
    """The alert of RULE whose last refusal carries one of CORRELATION_IDS (a rule counts afresh after each alert,
    so one of them crosses its threshold), waiting up to WAIT seconds for the audit service to record it."""
    # Accepted events of the audit service only: a refused event claiming to be an alert keeps its claimed type.
    query = (select(audit_log.c.seq, audit_log.c.producer, audit_log.c.event_id, audit_log.c.envelope)
             .where(audit_log.c.seq > after, audit_log.c.event_type == SecurityAlert.DESCRIPTOR.full_name,
                    audit_log.c.kind == RecordKind.EVENT.value, audit_log.c.producer == ALERTING_SERVICE)
             .order_by(audit_log.c.seq))
    deadline = time.monotonic() + wait
    while True:
        with session.audit_engine().connect() as conn:
            for seq, producer, event_id, envelope in conn.execute(query):
                alert = alert_in(envelope)
                if alert.rule == rule and alert.last_correlation_id in correlation_ids:
                    return FoundAlert(seq, producer, event_id, alert)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.5)
