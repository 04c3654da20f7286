"""Security alerts over the audit log's refusals (bastion/audit/alerts.py): when a rule fires and when it must not,
its memory bounds, a restart over the recent log, and the rules file refused when it is wrong."""

import datetime as dt
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bastion.access.v1.decision_pb2 import EventRejected
from bastion.audit.alerts import (
    AlertDetector,
    AlertRule,
    alert_in,
    load_alert_rules,
    longest_window,
    parse_alert_rules,
)
from bastion.audit.projections import SecurityRow
from bastion.devstack.errors import DevstackError
from bastion.events.envelopes import bundle, seal
from bastion.events.errors import VerificationError
from bastion.events.signing import bundles_of_one
from services.audit.domain import security_alert
from tests.unit.audit.samples import AUDIT_KEY

INFRA = Path(__file__).resolve().parents[3] / "infra"
T0 = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)
DENIED = "permission denied: role teller required"


def rule(**changes: Any) -> AlertRule:
    fields: dict[str, Any] = {
        "name": "permission-probing", "description": "probing", "severity": "warning", "kind": "denial",
        "count_by": "principal", "threshold": 5, "window": dt.timedelta(seconds=60),
        "reason_starts_with": ("permission denied",)}
    return AlertRule(**{**fields, **changes})


def denial(seq: int, seconds: float, principal: str = "mallory", reason: str = DENIED,
           peer: str = "cli") -> SecurityRow:
    return SecurityRow(seq, "access", principal, "accounts", "/bastion.accounts.v1.Accounts/Freeze", reason,
                       f"peer={peer}", "access.decisions.v1", 0, seq, f"event-{seq}", f"corr-{seq}",
                       T0 + dt.timedelta(seconds=seconds))


def rejection(seq: int, seconds: float, reason: str = "bad_signature", consumer: str = "audit") -> SecurityRow:
    return SecurityRow(seq, "rejection", consumer, "payments", "accounts.events.v1/0/9", reason, "detail",
                       "accounts.events.v1", 0, seq, f"event-{seq}", f"corr-{seq}", T0 + dt.timedelta(seconds=seconds))


def test_the_threshold_th_refusal_within_the_window_raises_one_alert() -> None:
    detector = AlertDetector([rule()])
    assert detector.observe([denial(seq, seq) for seq in range(1, 5)]) == []
    [alert] = detector.observe([denial(5, 5)])
    assert (alert.rule.name, alert.key, alert.count) == ("permission-probing", "mallory", 5)
    assert (alert.first_seq, alert.last_seq, alert.last_correlation_id) == (1, 5, "corr-5")
    assert (alert.first_at, alert.last_at) == (T0 + dt.timedelta(seconds=1), T0 + dt.timedelta(seconds=5))


def test_after_an_alert_the_key_counts_from_zero_so_a_steady_attack_raises_one_per_threshold() -> None:
    detector = AlertDetector([rule()])
    alerts = detector.observe([denial(seq, seq) for seq in range(1, 13)])
    assert [(alert.first_seq, alert.last_seq) for alert in alerts] == [(1, 5), (6, 10)]


def test_refusals_further_apart_than_the_window_never_add_up() -> None:
    detector = AlertDetector([rule()])
    # Five denials over 61 seconds: the first has left the window when the fifth arrives.
    assert detector.observe([denial(1, 0)] + [denial(seq, 58 + seq) for seq in range(2, 6)]) == []
    # A sixth within the window of the four before it: five in 60 seconds.
    [alert] = detector.observe([denial(6, 64)])
    assert (alert.first_seq, alert.count) == (2, 5)


def test_refusals_read_out_of_time_order_are_counted_by_when_they_occurred() -> None:
    # A backlog read one partition after another: an hour of slips is not a burst.
    detector = AlertDetector([rule()])
    assert detector.observe([denial(seq, at) for seq, at in enumerate([1800, 3600, 0, 600, 1200], start=1)]) == []
    # Five within a minute of each other, read in any order, are.
    [alert] = AlertDetector([rule()]).observe([denial(seq, at) for seq, at in
                                               enumerate([50, 10, 300, 40, 0, 30], start=1)])
    assert (alert.count, alert.first_seq, alert.last_seq) == (5, 1, 6)
    assert (alert.first_at, alert.last_at) == (T0, T0 + dt.timedelta(seconds=50))


def test_a_burst_read_after_many_later_refusals_of_its_key_is_still_found() -> None:
    spaced = [denial(seq, 300 + 20 * seq) for seq in range(1, 11)]  # four a minute: below the threshold
    burst = [denial(seq, 200 + seq) for seq in range(11, 16)]  # occurred before them, read after them
    [alert] = AlertDetector([rule()]).observe(spaced + burst)
    assert (alert.first_seq, alert.last_seq, alert.count) == (11, 15, 5)


def test_the_limit_a_refusal_read_far_behind_a_later_one_of_its_key_is_not_counted() -> None:
    # Pinned on purpose (docs/audit.md): with bounded memory, a key keeps its refusals back to the window plus five
    # minutes before its latest, so a partition read an hour behind another loses its burst for that key.
    rows = [denial(1, 0), denial(2, 1), denial(3, 3600), denial(4, 2), denial(5, 3)]
    assert AlertDetector([rule()]).observe(rows) == []
    assert [alert.last_seq for alert in AlertDetector([rule()]).observe([*rows[:2], *rows[3:], denial(6, 4)])] == [6]


def test_keys_are_counted_apart() -> None:
    detector = AlertDetector([rule()])
    rows = [denial(seq, seq, principal="alice" if seq % 2 else "bob") for seq in range(1, 9)]
    assert detector.observe(rows) == [], "four denials each of two callers"


def test_only_refusals_of_the_rules_kind_and_reasons_count() -> None:
    detector = AlertDetector([rule()])
    rows = [denial(1, 1, reason="rate limit of 5 calls per 1s exceeded"), rejection(2, 2),
            denial(3, 3, reason="invalid token: expired")]
    assert detector.observe(rows * 1 + [denial(seq, seq, reason="rate limit") for seq in range(4, 10)]) == []


def test_a_caller_without_a_valid_token_is_counted_by_its_certificate_not_by_an_empty_principal() -> None:
    by_principal = AlertDetector([rule(reason_starts_with=("invalid token",))])
    by_peer = AlertDetector([rule(name="token-guessing", count_by="peer", reason_starts_with=("invalid token",))])
    rows = [denial(seq, seq, principal="", reason="invalid token: bad signature") for seq in range(1, 6)]
    assert by_principal.observe(rows) == []
    [alert] = by_peer.observe(rows)
    assert alert.key == "cli"
    unknown_peer = [denial(seq, seq, principal="", peer="-", reason="invalid token: x") for seq in range(6, 12)]
    assert by_peer.observe(unknown_peer) == []


def test_rejections_can_be_counted_by_reason() -> None:
    detector = AlertDetector([rule(name="forged-events", kind="rejection", count_by="reason", threshold=2,
                                   window=dt.timedelta(seconds=300), reason_starts_with=("bad_signature",))])
    [alert] = detector.observe([rejection(1, 0), denial(2, 1), rejection(3, 200, consumer="accounts")])
    assert (alert.key, alert.first_seq, alert.last_seq) == ("bad_signature", 1, 3)


def test_a_batch_read_again_is_not_counted_twice() -> None:
    detector = AlertDetector([rule()])
    rows = [denial(seq, seq) for seq in range(1, 5)]
    assert detector.observe(rows) == []
    assert detector.observe(rows) == [], "the same four entries again are not eight denials"
    detector.seen_through(100)
    assert detector.observe([denial(50, 50)]) == [], "entries up to the head at start are not counted again"


def test_memory_is_bounded_by_forgetting_the_key_seen_longest_ago() -> None:
    detector = AlertDetector([rule(threshold=3)], max_keys=2)
    rows = [denial(1, 1, "a"), denial(2, 2, "a"), denial(3, 3, "b"), denial(4, 4, "c"), denial(5, 5, "a")]
    assert detector.observe(rows) == [], "a was forgotten when c came, so its third denial is its first again"
    [alert] = detector.observe([denial(6, 6, "c"), denial(7, 7, "c")])
    assert alert.key == "c"


def test_a_detector_started_again_over_the_recent_log_raises_what_one_running_throughout_would() -> None:
    # Seconds of each denial: an alert at the fifth (seq 5), two more, a restart, then three more.
    times = [0, 10, 20, 30, 60, 70, 100, 101, 102, 103]
    rows = [denial(seq, at) for seq, at in enumerate(times, start=1)]
    throughout = AlertDetector([rule()])
    before, after = throughout.observe(rows[:7]), throughout.observe(rows[7:])
    assert [alert.last_seq for alert in before + after] == [5, 10]
    # Started again after entry 7, at second 100: it reads the log's refusals of the last window (seq 5 to 7) and
    # the marks of the alerts raised (the last entry each counted, per rule and key), then goes on.
    marks = {(alert.rule.name, alert.key): alert.last_seq for alert in before}
    recent = [row for row in rows[:7] if row.occurred_at >= T0 + dt.timedelta(seconds=100 - 60)]
    restarted = AlertDetector([rule()])
    assert restarted.observe(recent, skip_through=marks) == []
    restarted.seen_through(7)
    assert restarted.observe(rows[7:]) == after
    # Without the marks it would count seq 5 a second time, and raise at seq 9 instead.
    forgetful = AlertDetector([rule()])
    forgetful.observe(recent)
    assert [alert.last_seq for alert in forgetful.observe(rows[7:])] == [9]


def test_a_threshold_of_one_makes_each_refusal_an_alert_of_its_own() -> None:
    detector = AlertDetector([rule(threshold=1)])
    alerts = detector.observe([denial(1, 1), denial(2, 2), denial(3, 200, "eve")])
    assert [(alert.key, alert.count, alert.first_seq, alert.last_seq) for alert in alerts] == [
        ("mallory", 1, 1, 1), ("mallory", 1, 2, 2), ("eve", 1, 3, 3)]
    assert len({alert.alert_id for alert in alerts}) == 3


def test_alert_ids_follow_from_what_raised_them() -> None:
    first = AlertDetector([rule()]).observe([denial(seq, seq) for seq in range(1, 6)])
    again = AlertDetector([rule()]).observe([denial(seq, seq) for seq in range(1, 6)])
    other = AlertDetector([rule()]).observe([denial(seq, seq, "eve") for seq in range(1, 6)])
    assert first[0].alert_id == again[0].alert_id != other[0].alert_id


def test_the_shipped_rules_load() -> None:
    rules = load_alert_rules(INFRA / "alert-rules.yaml")
    assert {"permission-probing", "token-guessing", "forged-events"} <= {rule.name for rule in rules}
    assert all(rule.reason_starts_with for rule in rules)


def good() -> dict[str, Any]:
    return {"name": "probe", "description": "d", "severity": "warning", "kind": "denial", "count_by": "principal",
            "threshold": 5, "window_seconds": 60}


@pytest.mark.parametrize(("change", "message"), [
    ({"colour": "red"}, r"unknown fields \['colour'\]"),
    ({"threshold": None}, "threshold must be a whole number"),
    ({"threshold": 0}, "threshold must be a whole number from 1"),
    ({"threshold": 101}, "threshold must be a whole number from 1 to 100"),
    ({"threshold": True}, "threshold must be a whole number"),
    ({"window_seconds": 0}, "window_seconds must be a whole number from 1"),
    ({"window_seconds": 86_401}, "window_seconds must be a whole number"),
    ({"kind": "alert"}, "kind must be one of denial, rejection"),
    ({"severity": "info"}, "severity must be one of warning, critical"),
    ({"count_by": "topic"}, "count_by must be one of"),
    ({"kind": "rejection", "count_by": "peer"}, "only a denial has a peer"),
    ({"reason_starts_with": [""]}, "reason_starts_with must be a list of non-empty texts"),
    ({"reason_starts_with": "permission"}, "reason_starts_with must be a list"),
    ({"name": "Probe Rule"}, "name 'Probe Rule' is not lower-case"),
    ({"name": "probe rule"}, "name 'probe rule' is not lower-case"),
    ({"name": "p" * 64}, "is not lower-case letters"),
    ({"description": "d" * 301}, "description must be text of at most 300 characters"),
    ({"reason_starts_with": [5]}, "reason_starts_with must be a list of non-empty texts"),
    ({"description": " "}, "description must be text"),
])
def test_a_wrong_rule_is_refused_with_a_message_that_names_it(change: dict[str, Any], message: str) -> None:
    with pytest.raises(DevstackError, match=message):
        parse_alert_rules({"rules": [{**good(), **change}]})


def test_a_missing_field_two_rules_of_one_name_or_another_shape_are_refused() -> None:
    missing = good()
    del missing["threshold"]
    with pytest.raises(DevstackError, match=r"missing fields \['threshold'\]"):
        parse_alert_rules({"rules": [missing]})
    with pytest.raises(DevstackError, match="rule names used twice: probe"):
        parse_alert_rules({"rules": [good(), good()]})
    for shape in (None, [], {"rules": {}}, {"rules": [], "extra": 1}, {"rules": ["probe"]}):
        with pytest.raises(DevstackError):
            parse_alert_rules(shape)


def test_a_rules_file_without_rules_is_refused_rather_than_switching_alerting_off(tmp_path: Path) -> None:
    with pytest.raises(DevstackError, match="no rules, so no refusal would ever raise an alert"):
        parse_alert_rules({"rules": []})
    (tmp_path / "emptied.yaml").write_text("rules: []\n")
    with pytest.raises(DevstackError, match="no rules"):
        load_alert_rules(tmp_path / "emptied.yaml")


def test_an_unreadable_rules_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DevstackError, match="cannot read the alert rules"):
        load_alert_rules(tmp_path / "absent.yaml")
    (tmp_path / "broken.yaml").write_text("rules: [\n")
    with pytest.raises(DevstackError, match="cannot read the alert rules"):
        load_alert_rules(tmp_path / "broken.yaml")


def shipped() -> AlertDetector:
    return AlertDetector(load_alert_rules(INFRA / "alert-rules.yaml"))


def raised(rows: list[SecurityRow]) -> list[tuple[str, str]]:
    return [(alert.rule.name, alert.key) for alert in shipped().observe(rows)]


def test_the_shipped_rules_catch_what_they_are_for_and_nothing_else() -> None:
    probing = [denial(seq, seq) for seq in range(1, 6)]
    assert raised(probing) == [("permission-probing", "mallory")]
    guessing = [denial(seq, seq, principal="", reason=reason) for seq, reason in
                enumerate(["missing bearer token", "invalid token: bad_signature", "invalid token: expired",
                           "invalid token: bad_audience", "invalid token: unknown_key"], start=1)]
    assert raised(guessing) == [("token-guessing", "cli")]
    assert raised([denial(seq, seq, reason="rate limit of 5 calls per 1s exceeded") for seq in range(1, 21)]) == [
        ("rate-limit-abuse", "mallory")]
    assert raised([rejection(1, 0), rejection(2, 5, consumer="notifications")]) == [
        ("forged-events", "bad_signature")]
    assert raised([rejection(seq, seq, reason="stale") for seq in range(1, 4)]) == [("stale-events", "stale")]
    assert raised([rejection(seq, seq, reason="handler_failed", consumer="notifications") for seq in range(1, 4)]
                  ) == [("failing-consumer", "notifications")]
    gap = rejection(1, 0, reason="sequence_gap", consumer="notifications")
    assert raised([gap]) == [("sequence-gaps", "notifications")], "one gap that stayed open is an alert"
    # Below each threshold, or spread out, nothing: a customer's occasional slip is not an attack.
    assert raised(probing[:4]) == raised(guessing[:4]) == raised([rejection(1, 0)]) == []
    outage = [denial(seq, seq, reason="rate limiter unavailable: request refused") for seq in range(1, 41)]
    assert raised(outage) == [], "Redis being away is an outage, not abuse by every caller"
    assert raised([denial(seq, seq * 20) for seq in range(1, 6)]) == []


def test_an_alert_reads_back_from_the_envelope_the_log_keeps_and_nothing_else_does() -> None:
    [alert] = AlertDetector([rule()]).observe([denial(seq, seq) for seq in range(1, 6)])
    envelope = seal(AUDIT_KEY, "security.alerts.v1", security_alert(alert), f"security-alert:{alert.alert_id}", 1,
                    alert.alert_id)
    relayed = bundles_of_one(bundle([envelope.SerializeToString()], AUDIT_KEY))[0].SerializeToString()
    for kept in (envelope.SerializeToString(), relayed):  # sent alone, or in a bundle by the outbox relay
        read = alert_in(kept)
        assert (read.rule, read.key, read.count, read.first_seq, read.last_seq) == (
            "permission-probing", "mallory", 5, 1, 5)
        assert read.first_at.ToDatetime(dt.UTC) == alert.first_at and read.last_correlation_id == "corr-5"
    other = seal(AUDIT_KEY, "access.decisions.v1", EventRejected(consumer="audit", reason="bad_signature"),
                 "consumer:audit", 1, "corr")
    for unreadable in (other.SerializeToString(), b"\xff\x00garbage", b""):
        with pytest.raises(VerificationError):
            alert_in(unreadable)


def test_a_rule_counts_only_refusals_of_its_own_kind() -> None:
    denials = AlertDetector([rule(reason_starts_with=())])
    assert denials.observe([rejection(seq, seq, consumer="mallory") for seq in range(1, 8)]) == []
    rejections = AlertDetector([rule(kind="rejection", reason_starts_with=(), threshold=2)])
    assert rejections.observe([denial(seq, seq, principal="audit") for seq in range(1, 8)]) == []


def test_a_rejection_is_never_counted_by_a_peer_whatever_its_detail_says() -> None:
    by_peer = AlertDetector([rule(kind="rejection", count_by="peer", reason_starts_with=(), threshold=1)])
    forged = SecurityRow(1, "rejection", "audit", "payments", "t/0/1", "bad_signature", "peer=cli", "t", 0, 1, "e",
                         "c", T0)
    assert by_peer.observe([forged]) == []


def test_a_long_key_is_counted_by_its_first_two_hundred_characters() -> None:
    detector = AlertDetector([rule(threshold=2)])
    [alert] = detector.observe([denial(1, 1, principal="m" * 250 + "a"), denial(2, 2, principal="m" * 250 + "b")])
    assert alert.key == "m" * 200


def test_alert_ids_tell_apart_rules_and_the_last_refusal_counted() -> None:
    alert = AlertDetector([rule(threshold=2)]).observe([denial(1, 1), denial(2, 2)])[0]
    other_rule = replace(alert, rule=rule(name="another-rule", threshold=2))
    later = replace(alert, last_seq=3)
    assert len({alert.alert_id, other_rule.alert_id, later.alert_id}) == 3
    assert replace(alert, first_seq=0).alert_id == alert.alert_id, "what raised it: the rule, key and last entry"


def test_what_an_earlier_alert_counted_is_skipped_for_its_own_key_only() -> None:
    restarted = AlertDetector([rule(threshold=2)])
    rows = [denial(1, 1, "bob"), denial(2, 2, "bob"), denial(3, 3, "alice")]
    [alert] = restarted.observe(rows, skip_through={("permission-probing", "alice"): 10})
    assert (alert.key, alert.first_seq, alert.last_seq) == ("bob", 1, 2)


def test_a_head_below_what_was_seen_does_not_let_entries_be_counted_again() -> None:
    detector = AlertDetector([rule()])
    assert detector.observe([denial(seq, seq) for seq in range(1, 5)]) == []
    detector.seen_through(2)
    assert detector.observe([denial(seq, seq) for seq in range(1, 5)]) == []


def test_the_key_seen_most_recently_is_kept_when_one_must_be_forgotten() -> None:
    detector = AlertDetector([rule(threshold=3)], max_keys=2)
    rows = [denial(1, 1, "a"), denial(2, 2, "b"), denial(3, 3, "a"), denial(4, 4, "c")]
    assert detector.observe(rows) == [], "b was seen longest ago when c came"
    [alert] = detector.observe([denial(5, 5, "a")])
    assert (alert.key, alert.first_seq) == ("a", 1)


def test_refusals_read_late_are_not_counted_once_far_behind_their_keys_latest() -> None:
    # The key's latest refusal occurred an hour after the five read after it: those are all beyond the span kept.
    rows = [denial(1, 3600), *(denial(seq, seq) for seq in range(2, 7))]
    assert AlertDetector([rule()]).observe(rows) == []


def test_a_refusal_exactly_the_window_plus_five_minutes_before_the_latest_is_still_counted() -> None:
    rows = [denial(1, 360), denial(2, 0), denial(3, 1), denial(4, 2), denial(5, 3), denial(6, 4)]
    [alert] = AlertDetector([rule()]).observe(rows)
    assert (alert.first_seq, alert.last_seq, alert.first_at) == (2, 6, T0)


def test_an_alert_names_the_correlation_id_of_the_refusal_that_completed_it() -> None:
    rows = [denial(seq, at) for seq, at in enumerate([50, 10, 300, 40, 0, 30], start=1)]
    [alert] = AlertDetector([rule()]).observe(rows)
    assert alert.last_correlation_id == "corr-6" and alert.last_at == T0 + dt.timedelta(seconds=50)


def test_how_many_refusals_a_key_keeps_is_what_its_span_holds_below_the_threshold_and_at_most_a_thousand() -> None:
    # Window plus five minutes overlaps ceil(span / window) + 1 window-long slices, each holding THRESHOLD - 1.
    assert rule(threshold=5).kept_per_key == 4 * (6 + 1)
    assert rule(threshold=3, window=dt.timedelta(seconds=300)).kept_per_key == 2 * (2 + 1)
    assert rule(threshold=1).kept_per_key == 1
    assert rule(threshold=100, window=dt.timedelta(seconds=1)).kept_per_key == 1000
    detector = AlertDetector([rule(threshold=100, window=dt.timedelta(seconds=1), reason_starts_with=())])
    # 91 refusals a second at most, never 100 in one: nothing raised, and the key keeps its newest thousand.
    assert detector.observe([denial(seq, seq * 0.011) for seq in range(1, 1201)]) == []
    assert len(detector._counted["permission-probing"]["mallory"]) == 1000


def test_the_longest_window_of_the_rules_is_how_far_back_a_restart_reads() -> None:
    rules = [rule(window=dt.timedelta(seconds=60)), rule(name="slow", window=dt.timedelta(hours=1)),
             rule(name="fast", window=dt.timedelta(seconds=5))]
    assert longest_window(rules) == dt.timedelta(hours=1)
    assert longest_window([]) == dt.timedelta(0)


def test_the_longest_rule_name_and_description_allowed_are_accepted() -> None:
    [longest] = parse_alert_rules({"rules": [{**good(), "name": "p" * 63, "description": "d" * 300}]})
    assert (len(longest.name), len(longest.description)) == (63, 300)
