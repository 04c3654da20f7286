"""`bastion audit refusals`, `bastion audit alerts` and `bastion trail` as they ask the audit service
(bastion/audit/refusals.py), on fakes for Keycloak and the channel: who asks (the realm's auditor, with an access
token), what is asked (refusals only, alerts only, one correlation id; the recent window), every page read, the
newest LIMIT kept, and only the audit service's own accepted alerts listed as alerts."""

import contextlib
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

from bastion.access.v1.decision_pb2 import EventRejected
from bastion.audit import refusals
from bastion.audit.alerts import AlertDetector, AlertRule
from bastion.audit.v1 import audit_pb2, audit_pb2_grpc
from bastion.devstack.errors import DevstackError
from bastion.devstack.identities import User
from bastion.events.envelopes import seal
from services.audit.domain import security_alert
from tests.unit.audit.samples import AUDIT_KEY
from tests.unit.audit.test_alerts import denial

ADA = User("ada", ("customer", "auditor"), "Ada", "Lovelace", "ada@example.org")
BOB = User("bob", ("customer",), "Bob", "Builder", "bob@example.org")
EVE = User("eve", ("auditor",), "Eve", "Second", "eve@example.org")


class Audit:
    """The audit service's ListEvents: PAGES in turn, each a list of events; a page token while more follow."""

    def __init__(self, pages: list[list[audit_pb2.AuditEvent]]) -> None:
        self.pages = pages
        self.asked: list[tuple[audit_pb2.ListEventsRequest, Any]] = []

    def ListEvents(self, request: audit_pb2.ListEventsRequest, metadata: Any, timeout: float
                   ) -> audit_pb2.ListEventsResponse:
        copy = audit_pb2.ListEventsRequest()
        copy.CopyFrom(request)
        self.asked.append((copy, metadata))
        number = len(self.asked)
        more = number < len(self.pages)
        return audit_pb2.ListEventsResponse(events=self.pages[number - 1],
                                            next_page_token=f"page-{number + 1}" if more else "")


class Keycloak:
    logins: ClassVar[list[tuple[str, str]]] = []

    def __init__(self, **_settings: Any) -> None:
        pass

    def token(self, username: str, password: str) -> dict[str, str]:
        Keycloak.logins.append((username, password))
        return {"access_token": f"access-of-{username}", "refresh_token": f"refresh-of-{username}"}


@pytest.fixture()
def audit(monkeypatch: pytest.MonkeyPatch) -> Iterator[Audit]:
    service = Audit([])
    Keycloak.logins = []

    @contextlib.contextmanager
    def channel(_address: str, _tls: Any, service: str) -> Iterator[str]:
        assert service == "audit", "the server must present the audit service's own certificate"
        yield "channel"

    monkeypatch.setattr(refusals, "KeycloakOpenID", Keycloak)
    monkeypatch.setattr(refusals, "load_identities", lambda _path, _services: SimpleNamespace(
        users=(BOB, ADA, EVE), realm="bastion", cli_client="bastion-cli"))
    monkeypatch.setattr(refusals, "blocking_channel", channel)
    monkeypatch.setattr(audit_pb2_grpc, "AuditStub", lambda _channel: service)
    yield service


CTX = SimpleNamespace(
    settings=SimpleNamespace(public_host="localhost", keycloak_port=8443, infra_dir=Path("infra")),
    service_names=["audit"], ca_file=Path("ca.pem"), credentials=SimpleNamespace(users={"ada": "pw-a", "eve": "pw-e"}),
    pki=SimpleNamespace(paths=lambda _name: SimpleNamespace(cert=Path("cli.pem"), key=Path("cli.key"))),
    grpc_address=lambda _service: "localhost:50054")


def event(seq: int, kind: str = "rejection", producer: str = "payments") -> audit_pb2.AuditEvent:
    return audit_pb2.AuditEvent(seq=seq, kind=kind, producer=producer)


def test_the_first_demo_user_holding_the_auditor_role_asks() -> None:
    assert refusals.auditor_of(SimpleNamespace(users=(BOB, ADA, EVE))) == "ada"  # type: ignore[arg-type]
    with pytest.raises(DevstackError, match="no demo user holds the auditor role"):
        refusals.auditor_of(SimpleNamespace(users=(BOB,)))  # type: ignore[arg-type]


def test_refusals_are_asked_as_the_auditor_with_an_access_token_for_the_recent_window_only(audit: Audit) -> None:
    audit.pages = [[event(1)]]
    before = dt.datetime.now(dt.UTC)
    assert [e.seq for e in refusals.recent_refusals(CTX, 30, 10)] == [1]  # type: ignore[arg-type]
    [(request, metadata)] = audit.asked
    assert Keycloak.logins == [("ada", "pw-a")]
    assert ("authorization", "Bearer access-of-ada") in metadata
    assert request.refusals_only and request.page_size == refusals.PAGE
    since = request.since.ToDatetime(dt.UTC)
    assert before - dt.timedelta(minutes=30, seconds=1) <= since <= dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30)


def test_every_page_is_read_and_the_newest_limit_kept_oldest_first(audit: Audit) -> None:
    audit.pages = [[event(1), event(2)], [event(3), event(4)], [event(5)]]
    assert [e.seq for e in refusals.recent_refusals(CTX, 60, 3)] == [3, 4, 5]  # type: ignore[arg-type]
    assert [request.page_token for request, _ in audit.asked] == ["", "page-2", "page-3"]


def test_a_trail_asks_for_its_correlation_id_over_the_whole_log_or_the_recent_window(audit: Audit) -> None:
    audit.pages = [[event(7, "event")]]
    assert [e.seq for e in refusals.carrying(CTX, "corr-7", None, 100)] == [7]  # type: ignore[arg-type]
    [(request, _)] = audit.asked
    assert request.correlation_id == "corr-7" and not request.HasField("since") and not request.refusals_only


@pytest.mark.parametrize(("minutes", "limit"), [(0, 10), (-1, 10), (60, 0)])
def test_a_window_or_limit_that_could_hold_nothing_is_refused_before_anyone_is_asked(
    audit: Audit, minutes: float, limit: int
) -> None:
    with pytest.raises(DevstackError, match="--minutes must be positive and --limit at least 1"):
        refusals.recent_refusals(CTX, minutes, limit)  # type: ignore[arg-type]
    assert audit.asked == [] and Keycloak.logins == []


def sealed_alert() -> bytes:
    rule = AlertRule("permission-probing", "probing", "warning", "denial", "principal", 5, dt.timedelta(seconds=60),
                     ("permission denied",))
    [alert] = AlertDetector([rule]).observe([denial(seq, seq) for seq in range(1, 6)])
    return seal(AUDIT_KEY, "security.alerts.v1", security_alert(alert), f"security-alert:{alert.alert_id}", 1,
                alert.alert_id).SerializeToString()


def test_only_alerts_the_audit_service_raised_and_its_log_accepted_are_listed_as_alerts(audit: Audit) -> None:
    raised = sealed_alert()
    forged = audit_pb2.AuditEvent(seq=2, kind="rejection", producer="audit", envelope=raised)  # refused: kept type
    claimed = audit_pb2.AuditEvent(seq=3, kind="event", producer="payments", envelope=raised)
    genuine = audit_pb2.AuditEvent(seq=4, kind="event", producer="audit", envelope=raised)
    other = seal(AUDIT_KEY, "access.decisions.v1", EventRejected(consumer="audit"), "consumer:audit", 1, "corr")
    unreadable = audit_pb2.AuditEvent(seq=5, kind="event", producer="audit", envelope=other.SerializeToString())
    audit.pages = [[forged, claimed, genuine, unreadable]]
    found = refusals.recent_alerts(CTX, 60, 10)  # type: ignore[arg-type]
    [(request, _)] = audit.asked
    assert request.event_type == "bastion.access.v1.SecurityAlert" and not request.refusals_only
    assert [record.seq for record, _ in found] == [4, 5]
    (_, alert), (_, reason) = found
    assert not isinstance(alert, str) and (alert.rule, alert.key, alert.count) == ("permission-probing", "mallory", 5)
    assert isinstance(reason, str) and "is not a security alert" in reason
