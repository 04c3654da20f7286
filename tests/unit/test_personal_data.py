"""The personal-data policy: readers must consume the topic, and listed fields must really be encrypted."""

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from bastion.devstack.errors import DevstackError
from bastion.devstack.event_access import load_policy
from bastion.events.personal_data import load_personal_data, parse_personal_data
from tests.unit.conftest import SERVICES

INFRA = Path(__file__).resolve().parents[2] / "infra"
ACCESS = load_policy(INFRA / "event-access.yaml", set(SERVICES))
TOPIC = "accounts.events.v1"
EMAIL = "bastion.accounts.v1.AccountOpened.owner_email"


def raw() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((INFRA / "personal-data.yaml").read_text())
    return data


def test_the_shipped_policy_loads() -> None:
    policy = load_personal_data(INFRA / "personal-data.yaml", ACCESS)
    assert policy.topics[TOPIC].encrypted_fields == (EMAIL,)
    assert policy.is_reader("notifications", TOPIC)
    assert not policy.is_reader("audit", TOPIC)
    assert not policy.is_reader("notifications", "payments.events.v1"), "a topic the policy does not list"
    assert policy.key_topics("accounts") == [TOPIC]
    assert policy.key_topics("notifications") == [TOPIC]
    assert policy.key_topics("audit") == []


@pytest.mark.parametrize("reader", ["payments", "accounts"], ids=["another-service", "the-producer"])
def test_a_reader_that_does_not_consume_the_topic_is_refused(reader: str) -> None:
    data = raw()
    data["topics"][TOPIC]["readers"].append(reader)
    with pytest.raises(DevstackError, match=f"reader '{reader}' is not a consumer of the topic"):
        parse_personal_data(data, ACCESS)


def test_a_topic_listed_without_fields_or_readers_has_no_readers() -> None:
    data = raw()
    data["topics"]["payments.events.v1"] = None
    policy = parse_personal_data(data, ACCESS)
    assert policy.topics["payments.events.v1"].readers == ()
    assert not policy.is_reader("notifications", "payments.events.v1")


def test_a_field_that_is_not_an_encrypted_field_is_refused() -> None:
    data = raw()
    data["topics"][TOPIC]["encrypted_fields"].append("bastion.accounts.v1.AccountOpened.owner")
    with pytest.raises(DevstackError, match=re.escape("AccountOpened.owner is not an EncryptedField")):
        parse_personal_data(data, ACCESS)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("bastion.accounts.v1.AccountOpened.no_such_field", re.escape("has no field 'no_such_field'")),
        ("bastion.accounts.v1.NoSuchEvent.owner_email", "not a field of a known event type"),
    ],
)
def test_a_field_that_does_not_exist_is_refused(name: str, message: str) -> None:
    data = raw()
    data["topics"][TOPIC]["encrypted_fields"].append(name)
    with pytest.raises(DevstackError, match=message):
        parse_personal_data(data, ACCESS)


def test_an_unknown_topic_is_refused() -> None:
    data = raw()
    data["topics"]["ghost.events.v1"] = {"encrypted_fields": [], "readers": []}
    with pytest.raises(DevstackError, match=re.escape("ghost.events.v1: not a topic of infra/event-access.yaml")):
        parse_personal_data(data, ACCESS)


def test_an_encrypted_field_nobody_lists_is_refused() -> None:
    data = raw()
    data["topics"][TOPIC]["encrypted_fields"].remove(EMAIL)
    with pytest.raises(DevstackError, match=re.escape(f"{EMAIL}: an EncryptedField that no topic lists")):
        parse_personal_data(data, ACCESS)


def test_unknown_keys_are_refused() -> None:
    data = raw()
    data["topics"][TOPIC]["reader"] = ["notifications"]
    with pytest.raises(DevstackError, match="unknown keys \\['reader'\\]"):
        parse_personal_data(data, ACCESS)
