"""Security alerts over the audit log's refusals: declarative rules (infra/alert-rules.yaml) and the detector that
applies them, pure (no I/O). The audit service runs it on every batch it appends (services/audit).

A rule counts the refusals of one kind (a denied call, or a refused event), optionally only those whose reason
starts with one of some texts, grouped by one of their fields (`count_by`): when THRESHOLD of them share a key
within WINDOW_SECONDS of each other (by the time the refusal occurred), the rule raises an alert for that key and
starts counting that key afresh. So a steady attack raises one alert per THRESHOLD refusals, not one per refusal.

What a rule may count by:
- `principal`: a denied call's caller (empty for a caller without a valid token: not counted), or the consumer
  that refused an event;
- `peer`: a denied call's mutual-TLS service identity (`cli` for people's tools), which also counts callers
  without a valid token;
- `producer`: the service that denied a call, or the producer a refused event claimed;
- `reason`: a refused event's reason (`bad_signature`, `replayed`, ...), or a denied call's message.

Refusals are read in log order, which is not always the order they occurred in (the decisions of several services
come from several partitions, and a backlog is read one partition after another), so "within the window" is
about when they occurred, not when they were read: a key keeps its refusals in time order, as far back as the
window plus OUT_OF_ORDER before its latest one. An alert counts the first THRESHOLD of them that lie within the
window, and the key then counts from zero again. The limit of this, with bounded memory: a refusal that occurred
more than the window plus OUT_OF_ORDER before a later refusal of its key that was read first (a backlog read
partition by partition, one partition far behind) is not counted. A key keeps at most as many refusals as that
span can hold without THRESHOLD of them within one window, and never more than MAX_KEPT_PER_KEY.

At most MAX_KEYS keys are kept per rule (the key seen longest ago is forgotten first), so a flood of distinct
keys (a `producer` or `reason` is what a refused event claimed) cannot exhaust memory; a forgotten key only
counts from zero again.
"""

import bisect
import datetime as dt
import math
import re
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from google.protobuf.message import DecodeError

from bastion.access.v1.decision_pb2 import SecurityAlert
from bastion.audit.projections import SecurityRow
from bastion.audit.records import RecordKind
from bastion.devstack.errors import DevstackError
from bastion.events.errors import RejectReason, VerificationError
from bastion.events.v1.envelope_pb2 import Envelope
from bastion.events.verify import decode_bundle, decode_envelope

KINDS = {"denial": RecordKind.ACCESS.value, "rejection": RecordKind.REJECTION.value}
COUNT_BY = ("principal", "peer", "producer", "reason")
SEVERITIES = ("warning", "critical")
RULE_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")
MAX_THRESHOLD = 100
MAX_WINDOW_SECONDS = 86_400
MAX_KEYS = 2_000
MAX_KEY = 200
MAX_DESCRIPTION = 300
MAX_KEPT_PER_KEY = 1_000
OUT_OF_ORDER = dt.timedelta(minutes=5)  # FreshnessWindow.max_age: what the broker may take after an event occurred
RULE_FIELDS = {"name", "description", "severity", "kind", "count_by", "threshold", "window_seconds",
               "reason_starts_with"}
# Alert ids are derived from what raised them, so raising the same alert twice (a batch read again) stores it once.
ALERT_NAMESPACE = uuid.UUID("5d1f0c3e-7a4b-4c8e-9f61-2b7e3a9d4c10")
ALERTING_SERVICE = "audit"  # the only producer a SecurityAlert is accepted from (infra/event-trust.yaml)
ALERTS_TOPIC = "security.alerts.v1"  # where it publishes them (infra/event-access.yaml)
PEER_PREFIX = "peer="  # a denied call's detail, as the audit service writes it (services/audit/domain.py)


@dataclass(frozen=True)
class AlertRule:
    name: str
    description: str
    severity: str
    kind: str  # "denial" or "rejection"
    count_by: str
    threshold: int
    window: dt.timedelta
    reason_starts_with: tuple[str, ...] = ()

    @property
    def kept_per_key(self) -> int:
        """How many refusals of one key the span a key keeps (window plus OUT_OF_ORDER) holds at most while no
        THRESHOLD of them lie within one window: fewer than THRESHOLD per window-long slice of it."""
        slices = math.ceil((self.window + OUT_OF_ORDER) / self.window) + 1
        return max(min((self.threshold - 1) * slices, MAX_KEPT_PER_KEY), 1)  # a threshold of 1 needs the one

    def key_of(self, row: SecurityRow) -> str | None:
        """The key ROW is counted under by this rule, or None when the rule does not count it."""
        if row.kind != KINDS[self.kind]:
            return None
        if self.reason_starts_with and not (row.reason or "").startswith(self.reason_starts_with):
            return None
        key = _field(row, self.count_by)
        return key[:MAX_KEY] if key else None


def _field(row: SecurityRow, name: str) -> str | None:
    if name == "peer":
        detail = row.detail or ""
        peer = detail[len(PEER_PREFIX):] if row.kind == RecordKind.ACCESS.value and detail.startswith(PEER_PREFIX) \
            else ""
        return peer if peer not in ("", "-") else None
    value: str | None = getattr(row, name)
    return value


@dataclass(frozen=True)
class Alert:
    rule: AlertRule
    key: str
    count: int
    first_seq: int
    last_seq: int
    first_at: dt.datetime
    last_at: dt.datetime
    last_correlation_id: str

    @property
    def alert_id(self) -> str:
        return str(uuid.uuid5(ALERT_NAMESPACE, f"{self.rule.name}\n{self.key}\n{self.last_seq}"))


@dataclass(frozen=True)
class _Counted:
    seq: int
    at: dt.datetime
    correlation_id: str


class AlertDetector:
    """Applies RULES to refusals in log order. `observe` takes the security-view rows of newly appended entries
    and returns the alerts they raise; `skip_through` says, per (rule, key), the last entry an earlier alert
    already counted (so a detector started again over the recent log does not count those twice)."""

    def __init__(self, rules: Sequence[AlertRule], max_keys: int = MAX_KEYS) -> None:
        self.rules = tuple(rules)
        self.max_keys = max_keys
        self.last_seq = 0
        self._counted: dict[str, OrderedDict[str, list[_Counted]]] = {rule.name: OrderedDict() for rule in rules}

    def observe(self, rows: Iterable[SecurityRow],
                skip_through: Mapping[tuple[str, str], int] | None = None) -> list[Alert]:
        alerts = []
        for row in rows:
            if row.seq <= self.last_seq:
                continue  # seen already (a batch read again)
            self.last_seq = row.seq
            for rule in self.rules:
                key = rule.key_of(row)
                if key is None or (skip_through and row.seq <= skip_through.get((rule.name, key), 0)):
                    continue
                alert = self._count(rule, key, _Counted(row.seq, row.occurred_at, row.correlation_id))
                if alert is not None:
                    alerts.append(alert)
        return alerts

    def seen_through(self, seq: int) -> None:
        """Entries up to SEQ were looked at (the log's head when the detector starts): never counted again."""
        self.last_seq = max(self.last_seq, seq)

    def _count(self, rule: AlertRule, key: str, refusal: _Counted) -> Alert | None:
        keys = self._counted[rule.name]
        counted = keys.get(key)
        if counted is None:
            counted = keys[key] = []
            if len(keys) > self.max_keys:
                keys.popitem(last=False)
        else:
            keys.move_to_end(key)
        bisect.insort(counted, refusal, key=lambda entry: (entry.at, entry.seq))
        horizon = counted[-1].at - rule.window - OUT_OF_ORDER
        while counted[0].at < horizon:
            del counted[0]
        del counted[:-rule.kept_per_key]
        window = _dense(counted, rule)
        if window is None:
            return None
        del keys[key]
        return Alert(rule, key, len(window), min(entry.seq for entry in window), refusal.seq, window[0].at,
                     window[-1].at, refusal.correlation_id)


def _dense(counted: list[_Counted], rule: AlertRule) -> list[_Counted] | None:
    """The first THRESHOLD refusals of COUNTED (in time order) that occurred within the window of each other, if
    any. Before the newest came there were none, so they are the ones it completes."""
    first = 0
    for last, entry in enumerate(counted):
        while entry.at - counted[first].at > rule.window:
            first += 1
        if last - first + 1 >= rule.threshold:
            return counted[first:last + 1]
    return None


def parse_alert_rules(raw: object, source: str = "alert rules") -> list[AlertRule]:
    """The rules of a parsed rules file; anything unexpected is refused with a message naming it."""
    if not isinstance(raw, dict) or set(raw) != {"rules"} or not isinstance(raw["rules"], list):
        raise DevstackError(f"{source}: expected a mapping with one key, `rules`, holding a list",
                            "see infra/alert-rules.yaml")
    if not raw["rules"]:
        # An emptied file would start the detector with nothing to look for: alerting off, and nothing saying so.
        raise DevstackError(f"{source}: no rules, so no refusal would ever raise an alert",
                            "restore infra/alert-rules.yaml (it ships the rules docs/audit.md lists)")
    rules = [_rule(entry, f"{source}: rule {index + 1}") for index, entry in enumerate(raw["rules"])]
    names = [rule.name for rule in rules]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DevstackError(f"{source}: rule names used twice: {', '.join(duplicates)}", "give each rule its own name")
    return rules


def _rule(entry: Any, where: str) -> AlertRule:
    if not isinstance(entry, dict):
        raise DevstackError(f"{where}: expected a mapping", "see infra/alert-rules.yaml")
    unknown, missing = set(entry) - RULE_FIELDS, RULE_FIELDS - {"reason_starts_with"} - set(entry)
    if unknown or missing:
        raise DevstackError(f"{where}: unknown fields {sorted(unknown)}, missing fields {sorted(missing)}",
                            f"a rule has the fields {', '.join(sorted(RULE_FIELDS))}")
    name = entry["name"]
    if not isinstance(name, str) or not RULE_NAME.fullmatch(name):
        raise DevstackError(f"{where}: name {name!r} is not lower-case letters, digits and dashes",
                            "for example: permission-probing")
    where = f"{where} ({name})"
    checks: list[tuple[bool, str]] = [
        (isinstance(entry["description"], str) and 0 < len(entry["description"].strip()) <= MAX_DESCRIPTION,
         f"description must be text of at most {MAX_DESCRIPTION} characters"),
        (entry["severity"] in SEVERITIES, f"severity must be one of {', '.join(SEVERITIES)}"),
        (entry["kind"] in KINDS, f"kind must be one of {', '.join(KINDS)}"),
        (entry["count_by"] in COUNT_BY, f"count_by must be one of {', '.join(COUNT_BY)}"),
        (entry["count_by"] != "peer" or entry["kind"] == "denial", "only a denial has a peer to count by"),
        (_whole(entry["threshold"], 1, MAX_THRESHOLD), f"threshold must be a whole number from 1 to {MAX_THRESHOLD}"),
        (_whole(entry["window_seconds"], 1, MAX_WINDOW_SECONDS),
         f"window_seconds must be a whole number from 1 to {MAX_WINDOW_SECONDS}"),
        (isinstance(entry.get("reason_starts_with", []), list)
         and all(isinstance(text, str) and text for text in entry.get("reason_starts_with", [])),
         "reason_starts_with must be a list of non-empty texts"),
    ]
    problems = [problem for ok, problem in checks if not ok]
    if problems:
        raise DevstackError(f"{where}: " + "; ".join(problems), "see the comments in infra/alert-rules.yaml")
    return AlertRule(name, entry["description"].strip(), entry["severity"], entry["kind"], entry["count_by"],
                     entry["threshold"], dt.timedelta(seconds=entry["window_seconds"]),
                     tuple(entry.get("reason_starts_with", [])))


def _whole(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def load_alert_rules(path: Path) -> list[AlertRule]:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise DevstackError(f"cannot read the alert rules {path}: {error}", "see infra/alert-rules.yaml") from None
    return parse_alert_rules(raw, str(path))


def longest_window(rules: Sequence[AlertRule]) -> dt.timedelta:
    return max((rule.window for rule in rules), default=dt.timedelta(0))



def how_often(count: int) -> str:
    """COUNT as people write it in an alert's text: "once", "5 times"."""
    return "once" if count == 1 else f"{count} times"


def alert_in(envelope: bytes) -> SecurityAlert:
    """The alert an audit log record holds: its envelope is kept as it verifies alone, a bundle of one when the
    outbox relay sent it in a bundle, or the envelope itself. Read back for people: only an accepted event of the
    audit service holds an alert (a refused record keeps the type its sender claimed); anything else that does
    not parse raises VerificationError."""
    try:
        event: Envelope = decode_bundle(envelope)[1][0]
    except VerificationError:
        event = decode_envelope(envelope)
    if event.event_type != SecurityAlert.DESCRIPTOR.full_name:
        raise VerificationError(RejectReason.UNKNOWN_TYPE, f"{event.event_type} is not a security alert")
    alert = SecurityAlert()
    try:
        alert.ParseFromString(event.payload)
    except DecodeError:
        raise VerificationError(RejectReason.MALFORMED, "the payload is not a SecurityAlert") from None
    return alert
