"""Security alerts told to people: the recipients file (checked at start-up), the notification an alert becomes,
and who gets it (the recipients only, each once, on their own stream)."""

from pathlib import Path
from typing import Any

import pytest

from bastion.access.v1.decision_pb2 import SecurityAlert
from bastion.audit.alert_recipients import load_alert_recipients, parse_alert_recipients
from bastion.devstack.errors import DevstackError
from bastion.devstack.identities import load_identities
from services.notifications.domain import alert_drafts
from tests.unit.conftest import SERVICES as PLATFORM_SERVICES

INFRA = Path(__file__).resolve().parents[3] / "infra"
SERVICES = set(PLATFORM_SERVICES)


def alert(**changes: Any) -> SecurityAlert:
    fields: dict[str, Any] = {
        "rule": "permission-probing", "severity": "warning", "description": "one caller denied again and again",
        "counted_by": "principal", "key": "alice", "count": 5, "window_seconds": 60, "first_seq": 10,
        "last_seq": 14, "last_correlation_id": "corr-14"}
    return SecurityAlert(**{**fields, **changes})


def test_the_shipped_recipients_are_auditors_of_the_dev_realm() -> None:
    recipients = load_alert_recipients(INFRA / "alert-recipients.yaml")
    users = {user.username: set(user.roles) for user in load_identities(INFRA / "keycloak" / "identities.yaml",
                                                                        SERVICES).users}
    assert recipients and all("auditor" in users.get(name, set()) for name in recipients), recipients


@pytest.mark.parametrize(("raw", "message"), [
    (None, "expected a mapping with one key"),
    ({"recipients": "ada"}, "expected a mapping with one key"),
    ({"recipients": ["ada"], "extra": 1}, "expected a mapping with one key"),
    ({"recipients": []}, "0 recipients; expected 1 to 50"),
    ({"recipients": ["ada", "ada"]}, "listed twice"),
    ({"recipients": ["Ada Lovelace"]}, "not a username: 'Ada Lovelace'"),
    ({"recipients": [7]}, "not a username: 7"),
    ({"recipients": [f"user{n}" for n in range(51)]}, "51 recipients"),
    ({"recipients": ["ada lovelace"]}, "not a username: 'ada lovelace'"),
    ({"recipients": ["a" * 101]}, "not a username"),
])
def test_a_wrong_recipients_file_is_refused_with_a_message_that_names_it(raw: object, message: str) -> None:
    with pytest.raises(DevstackError, match=message):
        parse_alert_recipients(raw)


def test_the_most_recipients_and_the_longest_username_allowed_are_taken_in_the_files_order() -> None:
    names = [f"user{n:02}" for n in range(50, 0, -1)]
    assert parse_alert_recipients({"recipients": names}) == tuple(names)
    assert parse_alert_recipients({"recipients": ["a" * 100, "ada"]}) == ("a" * 100, "ada")


def test_an_unreadable_recipients_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DevstackError, match="cannot read the alert recipients"):
        load_alert_recipients(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("recipients: [ada")
    with pytest.raises(DevstackError, match="cannot read the alert recipients"):
        load_alert_recipients(tmp_path / "bad.yaml")


def test_an_alert_tells_what_was_refused_and_where_to_look() -> None:
    [draft] = alert_drafts(alert(), ("ada",))
    assert (draft.recipient, draft.kind) == ("ada", "security_alert")
    assert draft.text == ("Security alert (warning) permission-probing: principal 'alice' refused 5 times within "
                          "60s, audit log entries 10 to 14 (`bastion audit alerts`). one caller denied again and again")


def test_an_alert_over_a_single_refusal_says_once() -> None:
    [draft] = alert_drafts(alert(rule="sequence-gaps", counted_by="consumer", key="notifications", count=1), ("ada",))
    assert "consumer 'notifications' refused once within 60s" in draft.text


def test_what_a_refused_event_claimed_is_bounded_and_printable_in_the_text() -> None:
    [draft] = alert_drafts(alert(counted_by="producer", key="evil\n\x1b[2Jproducer" + "x" * 500), ("ada",))
    assert "\n" not in draft.text and "\x1b" not in draft.text
    assert "x" * 200 not in draft.text


def test_every_text_an_alert_carries_is_printable_in_the_notification() -> None:
    [draft] = alert_drafts(
        alert(
            severity="warning\n",
            rule="permission-probing\x1b[2J",
            counted_by="principal\r",
            description="one caller denied\x07 again",
        ),
        ("ada",),
    )
    assert draft.text.isprintable(), draft.text
    assert draft.text.startswith("Security alert (warning\ufffd) permission-probing\ufffd[2J: principal\ufffd 'alice'")
    assert draft.text.endswith("one caller denied\ufffd again")
