"""The policy as the broker gets it (no broker: a fake admin client that holds ACLs, topics and offsets as a
broker would): exactly the shipped policy's ACLs, every other ACL deleted (a wildcard principal's, a DENY, a
prefixed pattern, another host, a principal the policy no longer names) but the stack's own principals', topics
created with their declared partitions and configuration, SCRAM credentials of the mechanism the clients use and of
no user the policy no longer names, and "has every group read what was written" told at its edges."""

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialDeletion,
    UserScramCredentialsDescription,
)

from bastion.devstack.components.kafka import Kafka
from bastion.devstack.event_access import AclGrant, EventAccessPolicy, TopicPolicy, load_policy
from bastion.devstack.kafka_admin import (
    ADMIN,
    BROKER_PRINCIPAL,
    SCRAM_ITERATIONS,
    AclChanges,
    KafkaAdmin,
    client_config,
)
from tests.unit.conftest import SERVICES as PLATFORM_SERVICES

INFRA = Path(__file__).resolve().parents[2] / "infra"
SERVICES = set(PLATFORM_SERVICES)


@dataclass
class Done:
    """A future that has completed (or failed)."""

    value: Any = None
    error: Exception | None = None

    def result(self, timeout: float | None = None) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


@dataclass
class Partitions:
    partitions: dict[int, object]


@dataclass
class Metadata:
    topics: dict[str, Partitions]


@dataclass
class Committed:
    topic_partitions: list[TopicPartition]


@dataclass
class FakeBroker:
    """The admin API's answers, from what this broker holds; every change is noted."""

    acls: list[AclBinding] = field(default_factory=list)
    topics: dict[str, int] = field(default_factory=dict)
    ends: dict[tuple[str, int], int] = field(default_factory=dict)
    committed: dict[tuple[str, str, int], int] = field(default_factory=dict)  # (group, topic, partition) -> offset
    created_topics: list[Any] = field(default_factory=list)
    altered: list[Any] = field(default_factory=list)
    deleted_filters: list[Any] = field(default_factory=list)
    scram: list[Any] = field(default_factory=list)
    users: dict[str, set[ScramMechanism]] = field(default_factory=dict)  # SCRAM user -> its credentials' mechanisms
    scram_deleted: list[UserScramCredentialDeletion] = field(default_factory=list)
    passwords: dict[tuple[str, ScramMechanism], bytes] = field(default_factory=dict)  # the last one set
    offset_requests: list[tuple[str, list[tuple[str, int]]]] = field(default_factory=list)
    already_exists: set[str] = field(default_factory=set)

    def describe_acls(self, _filter: Any, request_timeout: float) -> Done:
        return Done(list(self.acls))

    def create_acls(self, bindings: list[AclBinding], request_timeout: float) -> dict[Any, Done]:
        self.acls += bindings
        return {binding: Done() for binding in bindings}

    def delete_acls(self, filters: list[Any], request_timeout: float) -> dict[Any, Done]:
        self.deleted_filters += filters
        self.acls = [acl for acl in self.acls if not any(self._matches(f, acl) for f in filters)]
        return {f: Done() for f in filters}

    @staticmethod
    def _matches(filter_: Any, acl: AclBinding) -> bool:
        def fits(wanted: Any, have: Any, any_: Any = None) -> bool:
            return wanted is None or wanted == have or (any_ is not None and wanted == any_)

        return (fits(filter_.restype, acl.restype, ResourceType.ANY) and fits(filter_.name, acl.name)
                and fits(filter_.resource_pattern_type, acl.resource_pattern_type, ResourcePatternType.ANY)
                and fits(filter_.principal, acl.principal) and fits(filter_.host, acl.host)
                and fits(filter_.operation, acl.operation, AclOperation.ANY)
                and fits(filter_.permission_type, acl.permission_type, AclPermissionType.ANY))

    def list_topics(self, timeout: float) -> Metadata:
        return Metadata({name: Partitions(dict.fromkeys(range(count), object()))
                         for name, count in self.topics.items()})

    def incremental_alter_configs(self, resources: list[Any], request_timeout: float) -> dict[Any, Done]:
        self.altered += resources
        return {resource: Done() for resource in resources}

    def create_topics(self, new: list[Any], request_timeout: float) -> dict[str, Done]:
        self.created_topics += new
        answers = {}
        for topic in new:
            error = KafkaException(KafkaError(KafkaError.TOPIC_ALREADY_EXISTS)) if topic.topic in self.already_exists \
                else None
            answers[topic.topic] = Done(error=error)
        return answers

    def describe_user_scram_credentials(self, users: list[str] | None = None, request_timeout: float = 0) -> Done:
        assert users is None, "every user, in one answer"
        return Done({user: UserScramCredentialsDescription(
            user, [ScramCredentialInfo(mechanism, SCRAM_ITERATIONS) for mechanism in sorted(mechanisms)])
            for user, mechanisms in self.users.items()})

    def alter_user_scram_credentials(self, alterations: list[Any], request_timeout: float) -> dict[str, Done]:
        for alteration in alterations:
            if isinstance(alteration, UserScramCredentialDeletion):
                self.scram_deleted.append(alteration)
                self.users[alteration.user].remove(alteration.mechanism)
                if not self.users[alteration.user]:
                    del self.users[alteration.user]
            else:
                self.scram.append(alteration)
                mechanism = alteration.scram_credential_info.mechanism
                self.users.setdefault(alteration.user, set()).add(mechanism)
                self.passwords[(alteration.user, mechanism)] = alteration.password
        return {alteration.user: Done() for alteration in alterations}

    def list_offsets(self, places: dict[TopicPartition, Any], request_timeout: float) -> dict[TopicPartition, Done]:
        return {place: Done(TopicPartition(place.topic, place.partition, self.ends[(place.topic, place.partition)]))
                for place in places}

    def list_consumer_group_offsets(self, requests: list[Any]) -> dict[str, Done]:
        [request] = requests
        asked = [(place.topic, place.partition) for place in request.topic_partitions]
        self.offset_requests.append((request.group_id, asked))
        return {request.group_id: Done(Committed([
            TopicPartition(topic, partition, self.committed.get((request.group_id, topic, partition), -1001))
            for topic, partition in asked]))}


def admin_of(broker: FakeBroker) -> KafkaAdmin:
    admin = KafkaAdmin.__new__(KafkaAdmin)  # no AdminClient: nothing to connect to
    admin.client = broker  # type: ignore[assignment]
    return admin


def policy() -> EventAccessPolicy:
    return load_policy(INFRA / "event-access.yaml", SERVICES)


def acl(principal: str, name: str, operation: AclOperation = AclOperation.WRITE,
        permission: AclPermissionType = AclPermissionType.ALLOW,
        pattern: ResourcePatternType = ResourcePatternType.LITERAL, host: str = "*",
        restype: ResourceType = ResourceType.TOPIC) -> AclBinding:
    return AclBinding(restype, name, pattern, principal, host, operation, permission)


def held(broker: FakeBroker) -> set[tuple[Any, ...]]:
    return {(b.principal, b.restype.name, b.name, b.operation.name, b.permission_type.name,
             b.resource_pattern_type.name, b.host) for b in broker.acls}


def expected(grants: Iterable[AclGrant]) -> set[tuple[Any, ...]]:
    return {(g.kafka_principal, g.resource_type, g.resource_name, g.operation, "ALLOW", "LITERAL", "*") for g in grants}


def test_an_empty_broker_gets_exactly_the_policy_s_acls_literal_allow_for_every_host() -> None:
    broker = FakeBroker()
    grants = policy().grants()
    assert admin_of(broker).sync_acls(grants) == AclChanges(created=len(grants), deleted=0)
    assert held(broker) == expected(grants)
    assert ("User:accounts", "TOPIC", "accounts.events.v1", "WRITE", "ALLOW", "LITERAL", "*") in held(broker)
    assert admin_of(broker).sync_acls(grants) == AclChanges(created=0, deleted=0), "idempotent"


@pytest.mark.parametrize("stray", [
    acl("User:*", "accounts.events.v1"),
    acl("User:payments", "accounts.events.v1"),
    acl("User:accounts", "accounts.events.v1", permission=AclPermissionType.DENY),
    acl("User:accounts", "accounts", pattern=ResourcePatternType.PREFIXED),
    acl("User:accounts", "accounts.events.v1", pattern=ResourcePatternType.PREFIXED),
    acl("User:accounts", "accounts.events.v1", host="10.0.0.1"),
    acl("User:accounts", "kafka-cluster", AclOperation.ALTER, restype=ResourceType.BROKER),
    acl("User:accounts", "accounts.events.v1", AclOperation.ALL),
    acl("User:accounts", "accounts.events.v1", AclOperation.ALTER),
    acl("User:ledger", "accounts.events.v1", AclOperation.READ),
], ids=["wildcard-principal", "another-producer", "deny", "prefixed", "prefixed-same-name", "one-host", "cluster",
        "all-operations", "alter", "principal-no-longer-named"])
def test_every_acl_the_policy_does_not_make_is_deleted_and_the_policy_s_own_made(stray: AclBinding) -> None:
    broker = FakeBroker(acls=[stray])
    grants = policy().grants()
    changes = admin_of(broker).sync_acls(grants)
    assert held(broker) == expected(grants)
    assert changes == AclChanges(created=len(grants), deleted=1)


def test_acls_of_the_stack_s_own_principals_are_left_alone() -> None:
    """The admin's and the broker's are not the policy's to delete: they are the super users that apply it."""
    own = [acl("User:admin", "accounts.events.v1", AclOperation.ALL), acl("User:kafka", "payments.events.v1")]
    broker = FakeBroker(acls=list(own))
    admin_of(broker).sync_acls(policy().grants())
    assert all(binding in broker.acls for binding in own) and broker.deleted_filters == []


def test_a_deleted_acl_is_deleted_by_its_exact_binding_only() -> None:
    stray = acl("User:accounts", "accounts.events.v1", AclOperation.ALTER)
    broker = FakeBroker(acls=[stray])
    admin_of(broker).sync_acls(policy().grants())
    [deleted] = broker.deleted_filters
    assert (deleted.restype, deleted.name, deleted.resource_pattern_type, deleted.principal, deleted.host,
            deleted.operation, deleted.permission_type) == (ResourceType.TOPIC, "accounts.events.v1",
                                                            ResourcePatternType.LITERAL, "User:accounts", "*",
                                                            AclOperation.ALTER, AclPermissionType.ALLOW)


def test_topics_are_created_with_their_declared_partitions_and_configuration() -> None:
    broker = FakeBroker(topics={"payments.events.v1": 3}, already_exists={"accounts.events.v1"})
    declared = policy()
    created = admin_of(broker).ensure_topics(declared)
    assert "payments.events.v1" not in created and "accounts.events.v1" in created
    assert sorted(created) == sorted(name for name in declared.topics if name != "payments.events.v1")
    for new in broker.created_topics:
        topic = declared.topics[new.topic]
        assert (new.num_partitions, new.replication_factor, new.config) == (topic.partitions, 1, topic.config)
    # The topic that exists gets its declared configuration set.
    [altered] = broker.altered
    assert altered.name == "payments.events.v1"
    assert {entry.name: entry.value for entry in altered.incremental_configs} == \
        declared.topics["payments.events.v1"].config


def test_a_topic_that_cannot_be_created_is_an_error() -> None:
    broker = FakeBroker()
    broker.create_topics = lambda new, request_timeout: {  # type: ignore[method-assign]
        t.topic: Done(error=KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))) for t in new}
    with pytest.raises(KafkaException):
        admin_of(broker).ensure_topics(policy())


def test_a_configuration_the_broker_refuses_to_set_is_an_error() -> None:
    broker = FakeBroker(topics=dict.fromkeys(policy().topics, 1))
    broker.incremental_alter_configs = lambda resources, request_timeout: {  # type: ignore[method-assign]
        r: Done(error=KafkaException(KafkaError(KafkaError.POLICY_VIOLATION))) for r in resources}
    with pytest.raises(KafkaException):
        admin_of(broker).ensure_topics(policy())


def test_nothing_is_created_or_altered_when_every_topic_exists_without_configuration() -> None:
    bare = EventAccessPolicy({"t.one": TopicPolicy("t.one", 2, ("accounts",), {})})
    broker = FakeBroker(topics={"t.one": 2})
    assert admin_of(broker).ensure_topics(bare) == []
    assert broker.created_topics == [] and broker.altered == []


def test_scram_credentials_are_sha_512_like_the_clients_and_not_weaker_than_8192_iterations() -> None:
    broker = FakeBroker()
    admin_of(broker).upsert_scram_users({"payments": "p", "accounts": "a"})
    assert [(u.user, u.password) for u in broker.scram] == [("accounts", b"a"), ("payments", b"p")]
    for upsert in broker.scram:
        assert upsert.scram_credential_info.mechanism == ScramMechanism.SCRAM_SHA_512
        assert upsert.scram_credential_info.iterations == SCRAM_ITERATIONS >= 8192
    assert client_config("b:1", "ca.pem", "u", "p")["sasl.mechanism"] == "SCRAM-SHA-512"


LEDGER_POLICY = """
topics:
  ledger.events.v1:
    partitions: 1
    producers: [ledger]
    consumers: {audit: audit-ledger}
  ledger.events.v1.dlq:
    producers: [audit]
"""


def applying(folder: Path, broker: FakeBroker, services: list[str], event_access: str) -> Kafka:
    """The Kafka component whose `bootstrap` applies EVENT_ACCESS (kept in FOLDER) for SERVICES to BROKER, as
    `bastion up` does."""
    folder.mkdir(exist_ok=True)
    (folder / "event-access.yaml").write_text(event_access)
    ctx = SimpleNamespace(settings=SimpleNamespace(infra_dir=folder), service_names=services,
                          credentials=SimpleNamespace(kafka={name: f"{name}-secret" for name in services}))
    kafka = Kafka(ctx)  # type: ignore[arg-type]
    kafka.admin = lambda: admin_of(broker)  # type: ignore[method-assign]
    return kafka


def test_a_principal_gone_from_the_policy_is_locked_out_and_loses_its_acls(tmp_path: Path) -> None:
    """A service removed (or renamed) keeps nothing on the broker: its old password would still log in, and still
    read and write its old topics. Its credentials are set to a random password, never deleted (see
    `KafkaAdmin.lock_scram_users_except`). The admin, the broker's principal and the remaining services keep
    theirs."""
    admin_acl = acl("User:admin", "ledger.events.v1", AclOperation.ALL)
    broker = FakeBroker(acls=[admin_acl], users={ADMIN: {ScramMechanism.SCRAM_SHA_512},
                                                 BROKER_PRINCIPAL: {ScramMechanism.SCRAM_SHA_256}})
    applying(tmp_path, broker, ["audit", "ledger"], LEDGER_POLICY).bootstrap()
    assert set(broker.users) == {ADMIN, BROKER_PRINCIPAL, "audit", "ledger"}
    assert any(b.principal == "User:ledger" for b in broker.acls)
    sha_256 = ("ledger", ScramMechanism.SCRAM_SHA_256)
    broker.users["ledger"].add(sha_256[1])  # a credential of another mechanism is locked too
    broker.passwords[sha_256] = b"ledger-secret"
    audits = broker.passwords[("audit", ScramMechanism.SCRAM_SHA_512)]

    without_ledger = LEDGER_POLICY.replace("producers: [ledger]", "producers: []")
    applying(tmp_path, broker, ["audit"], without_ledger).bootstrap()
    assert broker.scram_deleted == [], "locked, never deleted"
    for mechanism in (ScramMechanism.SCRAM_SHA_512, ScramMechanism.SCRAM_SHA_256):
        locked = broker.passwords[("ledger", mechanism)]
        assert locked != b"ledger-secret" and len(locked) >= 32, mechanism
    assert broker.passwords[("audit", ScramMechanism.SCRAM_SHA_512)] == audits
    assert not [b for b in broker.acls if b.principal == "User:ledger"]
    assert admin_acl in broker.acls
    grants = load_policy(tmp_path / "event-access.yaml", {"audit"}).grants()
    assert grants and held(broker) == expected(grants) | held(FakeBroker([admin_acl]))


def test_applying_an_unchanged_policy_again_removes_nothing(tmp_path: Path) -> None:
    broker = FakeBroker(users={ADMIN: {ScramMechanism.SCRAM_SHA_512}})
    kafka = applying(tmp_path, broker, ["audit", "ledger"], LEDGER_POLICY)
    kafka.bootstrap()
    before = ({user: set(mechanisms) for user, mechanisms in broker.users.items()}, list(broker.acls),
              dict(broker.passwords))
    kafka.bootstrap()
    assert broker.scram_deleted == [] and broker.deleted_filters == []
    assert (broker.users, broker.acls, broker.passwords) == before


def test_the_admin_and_the_broker_principal_keep_their_credentials_whatever_the_policy() -> None:
    broker = FakeBroker(users={ADMIN: {ScramMechanism.SCRAM_SHA_512}, BROKER_PRINCIPAL: {ScramMechanism.SCRAM_SHA_512},
                               "stale": {ScramMechanism.SCRAM_SHA_512}})
    assert admin_of(broker).sync_scram_users({}) == ["stale"]
    assert [upsert.user for upsert in broker.scram] == ["stale"], "only the stale user's credential was set"


def reading(broker: FakeBroker, groups_by_topic: dict[str, tuple[str, ...]]) -> list[str]:
    admin = admin_of(broker)
    return admin.unread(groups_by_topic, admin.ends(groups_by_topic))


def test_a_group_is_behind_until_it_has_committed_the_end_of_every_partition() -> None:
    broker = FakeBroker(topics={"t": 2}, ends={("t", 0): 5, ("t", 1): 3})
    assert reading(broker, {"t": ("g",)}) == ["g on t/0", "g on t/1"]
    broker.committed = {("g", "t", 0): 5, ("g", "t", 1): 2}
    assert reading(broker, {"t": ("g",)}) == ["g on t/1"], "one short of the end is not read"
    broker.committed[("g", "t", 1)] = 3
    assert reading(broker, {"t": ("g",)}) == []


def test_an_empty_partition_needs_no_commit_and_a_group_is_asked_only_about_its_own_topics() -> None:
    broker = FakeBroker(topics={"t": 2, "u": 1, "empty": 1}, ends={("t", 0): 0, ("t", 1): 4, ("u", 0): 2,
                                                                    ("empty", 0): 0})
    broker.committed = {("g", "t", 1): 4, ("h", "u", 0): 2}
    assert reading(broker, {"t": ("g",), "u": ("h",), "empty": ("e",)}) == []
    assert broker.offset_requests == [("g", [("t", 1)]), ("h", [("u", 0)])]


def test_waiting_gives_the_groups_their_time_and_no_more() -> None:
    broker = FakeBroker(topics={"t": 1}, ends={("t", 0): 1})
    admin = admin_of(broker)
    calls = []
    unread = admin.unread

    def catching_up(groups_by_topic: Any, ends: Any) -> list[str]:
        calls.append(1)
        if len(calls) == 2:
            broker.committed[("g", "t", 0)] = 1
        return unread(groups_by_topic, ends)

    admin.unread = catching_up  # type: ignore[method-assign]
    assert admin.wait_until_read({"t": ("g",)}, 30.0) == [] and len(calls) == 2
    broker.committed.clear()
    calls.clear()
    assert admin.wait_until_read({"t": ("g",)}, 0.0) == ["g on t/0"]
