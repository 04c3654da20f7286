"""The event-access policy file: checks that reject inconsistent policies, and the ACLs it grants."""

from pathlib import Path
from typing import Any

import pytest
import yaml

from bastion.devstack.errors import DevstackError
from bastion.devstack.event_access import AclGrant, load_policy, parse_policy
from tests.unit.conftest import SERVICES as PLATFORM_SERVICES

INFRA = Path(__file__).resolve().parents[2] / "infra"
SERVICES = set(PLATFORM_SERVICES)


def policy(**topics: Any) -> dict[str, Any]:
    return {"topics": topics}


def test_the_shipped_policy_is_consistent() -> None:
    loaded = load_policy(INFRA / "event-access.yaml", SERVICES)
    assert {"accounts.events.v1", "payments.events.v1", "access.decisions.v1", "audit.checkpoints.v1",
            "security.alerts.v1"} <= set(loaded.topics)
    assert loaded.principals <= SERVICES


def test_the_principals_are_every_producer_and_every_consumer() -> None:
    """Each needs a Kafka SCRAM secret: a principal left out could not connect. Here payments only reads."""
    loaded = parse_policy(
        policy(**{"t.v1": {"producers": ["accounts"], "consumers": {"audit": "audit-g"}},
                  "t.v1.dlq": {"producers": ["audit"], "consumers": {"payments": "payments-g"}}}),
        SERVICES,
    )
    assert loaded.principals == {"accounts", "audit", "payments"}


def test_each_consuming_service_subscribes_to_exactly_the_topics_it_may_read() -> None:
    from services.audit.server import TOPICS as AUDIT_TOPICS
    from services.notifications.server import TOPICS as NOTIFICATIONS_TOPICS

    loaded = load_policy(INFRA / "event-access.yaml", SERVICES)
    for service, subscribed in (("audit", AUDIT_TOPICS), ("notifications", NOTIFICATIONS_TOPICS)):
        readable = {name for name, topic in loaded.topics.items()
                    if service in topic.consumers and not name.endswith(".dlq")}
        assert set(subscribed) == readable, service


def test_a_producers_readers_are_the_groups_of_the_topics_it_signs_for_never_of_dead_letters() -> None:
    """What `bastion keys retire` waits for: the audit service also writes dead letters (other producers' refused
    records, not signed by it), and no service consumes a dead-letter topic, so waiting for one would never end."""
    loaded = load_policy(INFRA / "event-access.yaml", SERVICES)
    decisions = {"access.decisions.v1": ("audit",)}
    assert loaded.readers_of("payments") == {"payments.events.v1": ("audit", "notifications"), **decisions}
    assert loaded.readers_of("notifications") == decisions, "its dead letters of accounts and payments left out"
    assert loaded.readers_of("audit") == {"security.alerts.v1": ("audit", "notifications"), **decisions}


def test_only_declared_producers_may_write_domain_topics() -> None:
    grants = load_policy(INFRA / "event-access.yaml", SERVICES).grants()
    writers = {g.principal for g in grants if g.resource_name == "accounts.events.v1" and g.operation == "WRITE"}
    assert writers == {"accounts"}
    assert AclGrant("payments", "TOPIC", "accounts.events.v1", "WRITE") not in grants


def test_consumers_get_read_on_topic_and_own_group_only() -> None:
    grants = parse_policy(
        policy(**{"t.v1": {"producers": ["accounts"], "consumers": {"audit": "audit-g"}},
                  "t.v1.dlq": {"producers": ["audit"], "consumers": {}}}),
        SERVICES,
    ).grants()
    audit = {g for g in grants if g.principal == "audit"}
    assert audit == {
        AclGrant("audit", "TOPIC", "t.v1", "READ"),
        AclGrant("audit", "TOPIC", "t.v1", "DESCRIBE"),
        AclGrant("audit", "GROUP", "audit-g", "READ"),
        AclGrant("audit", "TOPIC", "t.v1.dlq", "WRITE"),
        AclGrant("audit", "TOPIC", "t.v1.dlq", "DESCRIBE"),
    }


def test_a_witness_reads_the_topic_under_its_own_group_and_needs_no_dead_letters() -> None:
    loaded = parse_policy(policy(**{"t.v1": {"producers": ["audit"], "witnesses": {"payments": "payments-w"}}}),
                          SERVICES)
    assert {g for g in loaded.grants() if g.principal == "payments"} == {
        AclGrant("payments", "TOPIC", "t.v1", "READ"),
        AclGrant("payments", "TOPIC", "t.v1", "DESCRIBE"),
        AclGrant("payments", "GROUP", "payments-w", "READ"),
    }
    assert loaded.principals == {"audit", "payments"}, "a witness needs a Kafka secret too"
    assert loaded.readers_of("audit") == {}, "nothing to wait for: a witness consumes nothing"


def test_the_audit_service_witnesses_its_published_checkpoints_under_the_group_it_reads_with() -> None:
    from services.audit.server import WITNESS_GROUP

    loaded = load_policy(INFRA / "event-access.yaml", SERVICES)
    checkpoints = loaded.topics["audit.checkpoints.v1"]
    assert checkpoints.witnesses == {"audit": WITNESS_GROUP} and checkpoints.consumers == {}
    assert checkpoints.producers == ("audit",)


@pytest.mark.parametrize(
    ("topics", "problem"),
    [
        ({"t.v1": {"producers": ["mallory"]}}, "'mallory' is not a service"),
        ({"T_V1": {"producers": ["accounts"]}}, "not a valid topic name"),
        ({"t.v1\n": {"producers": ["accounts"]}}, "not a valid topic name"),
        ({"t.v1": {"producers": ["accounts"], "consumers": {"audit": "audit"}}}, "no dead-letter topic"),
        (
            {"t.v1": {"producers": ["accounts"], "consumers": {"audit": "audit"}},
             "t.v1.dlq": {"producers": ["payments"]}},
            "must equal the consumers",
        ),
        (
            {"t.v1": {"producers": ["accounts"], "consumers": {"audit": "audit"}},
             "t.v1.dlq": {"producers": ["audit", "payments"]}},
            "must equal the consumers",
        ),
        (
            {"t.v1": {"producers": ["accounts"], "consumers": {"audit": "audit", "payments": "payments"}},
             "t.v1.dlq": {"producers": ["audit"]}},
            "must equal the consumers",
        ),
        ({"t.v1.dlq": {"producers": ["audit"]}}, "dead-letter topic of an undeclared topic"),
        ({"t.v1": {"producers": ["accounts"], "writers": ["audit"]}}, "unknown keys"),
        ({"t.v1": {"producers": ["accounts"], "witnesses": {"mallory": "m"}}}, "'mallory' is not a service"),
        ({"t.v1": {"producers": ["accounts"], "consumers": {"audit": "shared"}, "witnesses": {"payments": "shared"}},
          "t.v1.dlq": {"producers": ["audit"]}}, "consumer group 'shared' is granted to \\['audit', 'payments'\\]"),
        ({"t.v1": {"producers": ["accounts"], "consumers": {"audit": "shared", "notifications": "shared"}},
          "t.v1.dlq": {"producers": ["audit", "notifications"]}}, "each principal needs a group of its own"),
        # Kafka reads a literal "*" as every group: READ on it would let audit commit every other group's offsets.
        ({"t.v1": {"producers": ["accounts"], "consumers": {"audit": "*"}}, "t.v1.dlq": {"producers": ["audit"]}},
         "consumer group '\\*' is not a valid group name"),
        ({"t.v1": {"producers": ["accounts"], "witnesses": {"payments": "*"}}},
         "consumer group '\\*' is not a valid group name"),
        ({"..": {"producers": ["accounts"]}}, "not a valid topic name"),
        ({"t..v1": {"producers": ["accounts"]}}, "not a valid topic name"),
    ],
)
def test_inconsistent_policies_are_refused(topics: dict[str, Any], problem: str) -> None:
    with pytest.raises(DevstackError, match=problem):
        parse_policy(policy(**topics), SERVICES)


def test_shipped_file_parses_as_yaml_mapping() -> None:
    assert isinstance(yaml.safe_load((INFRA / "event-access.yaml").read_text())["topics"], dict)
