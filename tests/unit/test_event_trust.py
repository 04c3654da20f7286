"""The event trust policy agrees with the Kafka ACLs, and refuses to load when it does not."""

from pathlib import Path
from typing import Any

import pytest
import yaml

from bastion.devstack.errors import DevstackError
from bastion.devstack.event_access import load_policy
from bastion.events.catalog import SCHEMAS
from bastion.events.errors import RejectReason, VerificationError
from bastion.events.trust import load_trust_policy, parse_trust_policy
from tests.unit.conftest import SERVICES

INFRA = Path(__file__).resolve().parents[2] / "infra"
ACCESS = load_policy(INFRA / "event-access.yaml", set(SERVICES))


def raw() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((INFRA / "event-trust.yaml").read_text())
    return data


def test_shipped_trust_policy_agrees_with_the_acls_and_names_known_types() -> None:
    policy = load_trust_policy(INFRA / "event-trust.yaml", ACCESS)
    assert policy.event_types() <= set(SCHEMAS)
    policy.check("accounts.events.v1", "accounts", "bastion.accounts.v1.MoneyDeposited")


def test_a_producer_without_the_write_acl_is_a_contradiction() -> None:
    data = raw()
    data["topics"]["accounts.events.v1"]["payments"] = ["bastion.accounts.v1.MoneyDeposited"]
    with pytest.raises(DevstackError, match="'payments' may emit here but has no WRITE ACL"):
        parse_trust_policy(data, ACCESS)


def test_a_writer_without_a_trust_entry_is_a_contradiction() -> None:
    data = raw()
    del data["topics"]["payments.events.v1"]
    with pytest.raises(DevstackError, match="'payments' may write \\(ACL\\) but has no entry"):
        parse_trust_policy(data, ACCESS)


@pytest.mark.parametrize("types", ["bastion.accounts.v1.MoneyDeposited", None, [""], [7], [[]], 7, True])
def test_event_types_given_other_than_as_a_list_of_names_are_refused(types: object) -> None:
    """A bare string would be read letter by letter: every event of the producer refused at run time instead."""
    data = raw()
    data["topics"]["accounts.events.v1"]["accounts"] = types
    with pytest.raises(DevstackError, match="event types of 'accounts' must be a list of names"):
        parse_trust_policy(data, ACCESS)


def test_unknown_topic_is_a_contradiction() -> None:
    data = raw()
    data["topics"]["ledger.events.v1"] = {"accounts": []}
    with pytest.raises(DevstackError, match=r"ledger\.events\.v1: not a topic"):
        parse_trust_policy(data, ACCESS)


def test_only_the_audit_service_may_publish_a_security_alert_and_only_on_its_topic() -> None:
    policy = load_trust_policy(INFRA / "event-trust.yaml", ACCESS)
    alert = "bastion.access.v1.SecurityAlert"
    policy.check("security.alerts.v1", "audit", alert)
    refusals = [("security.alerts.v1", service) for service in ("accounts", "payments", "notifications")]
    refusals += [("access.decisions.v1", service) for service in ("accounts", "payments", "notifications", "audit")]
    for topic, service in refusals:
        with pytest.raises(VerificationError) as refused:
            policy.check(topic, service, alert)
        assert refused.value.reason is RejectReason.NOT_AUTHORISED, (topic, service)
    with pytest.raises(VerificationError):
        policy.check("security.alerts.v1", "audit", "bastion.access.v1.AccessDecision")
