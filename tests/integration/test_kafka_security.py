"""Kafka: SASL_SSL + SCRAM for clients, TLS client certificates for the controller, default-deny ACLs."""

import secrets
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    NewTopic,
    ResourcePatternType,
    ResourceType,
)

from bastion.devstack.components.kafka import Kafka
from bastion.devstack.context import StackContext
from bastion.devstack.event_access import AclGrant, EventAccessPolicy, TopicPolicy
from bastion.devstack.kafka_admin import ADMIN, EVERY_ACL
from bastion.devstack.pki import DevPki

TIMEOUT = 20.0


def produce(kafka: Kafka, ctx: StackContext, user: str, topic: str, value: bytes) -> KafkaError | None:
    """Produce one record and return the delivery error (None when the broker acknowledged it)."""
    producer = Producer(
        {**kafka.client_config(user, ctx.credentials.kafka[user]), "enable.idempotence": True, "acks": "all",
         "message.timeout.ms": 15000}
    )
    outcome: list[KafkaError | None] = []
    producer.produce(topic, value, on_delivery=lambda err, msg: outcome.append(err))
    producer.flush(TIMEOUT)
    assert outcome, "no delivery report within the timeout"
    return outcome[0]


def consume_one(kafka: Kafka, ctx: StackContext, user: str, topic: str, group: str) -> Any:
    """Poll until one record or an error arrives; returns the message (check .error())."""
    consumer = Consumer(
        {**kafka.client_config(user, ctx.credentials.kafka[user]), "group.id": group,
         "auto.offset.reset": "earliest", "enable.auto.commit": False}
    )
    consumer.subscribe([topic])
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is not None:
                return msg
        pytest.fail(f"{user} received nothing from {topic} within {TIMEOUT}s")
    finally:
        consumer.close()


@pytest.fixture()
def own_topic(kafka: Kafka, unique: str) -> Iterator[TopicPolicy]:
    """A throw-away topic: accounts produces, notifications consumes with its own group."""
    topic = TopicPolicy(f"it.{unique}.v1", 1, ("accounts",), {"notifications": f"it-{unique}"})
    policy = EventAccessPolicy({topic.name: topic})
    admin = kafka.admin()
    admin.ensure_topics(policy)
    admin.grant(policy.grants())
    yield topic
    admin.revoke(policy.grants())
    admin.client.delete_topics([topic.name])


def test_service_principal_produces_and_consumes_on_its_own_topic(
    kafka: Kafka, ctx: StackContext, own_topic: TopicPolicy
) -> None:
    assert produce(kafka, ctx, "accounts", own_topic.name, b"account-opened") is None
    msg = consume_one(kafka, ctx, "notifications", own_topic.name, own_topic.consumers["notifications"])
    assert msg.error() is None
    assert msg.value() == b"account-opened"


def test_principal_without_write_acl_gets_topic_authorization_failed(
    kafka: Kafka, ctx: StackContext, own_topic: TopicPolicy
) -> None:
    error = produce(kafka, ctx, "payments", own_topic.name, b"forged")
    assert error is not None and error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED


def test_shipped_policy_refuses_a_service_writing_another_services_topic(kafka: Kafka, ctx: StackContext) -> None:
    error = produce(kafka, ctx, "payments", "accounts.events.v1", b"forged")
    assert error is not None and error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED


def test_principal_reading_a_topic_it_is_not_listed_for_is_refused(
    kafka: Kafka, ctx: StackContext, own_topic: TopicPolicy, unique: str
) -> None:
    group = f"it-{unique}-payments"
    kafka.admin().grant({AclGrant("payments", "GROUP", group, "READ")})
    try:
        msg = consume_one(kafka, ctx, "payments", own_topic.name, group)
        assert msg.error() is not None
        assert msg.error().code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    finally:
        kafka.admin().revoke({AclGrant("payments", "GROUP", group, "READ")})


def test_consumer_outside_its_group_is_refused(kafka: Kafka, ctx: StackContext, own_topic: TopicPolicy) -> None:
    msg = consume_one(kafka, ctx, "notifications", own_topic.name, "someone-elses-group")
    assert msg.error() is not None
    assert msg.error().code() == KafkaError.GROUP_AUTHORIZATION_FAILED


def _auth_errors(config: dict[str, Any]) -> tuple[list[KafkaError], bool]:
    """Ask for metadata; return the errors librdkafka reported and whether any metadata came back."""
    errors: list[KafkaError] = []
    client = AdminClient({**config, "error_cb": errors.append, "logger": None})
    answered = True
    try:
        client.list_topics(timeout=6)
    except KafkaException:
        answered = False
    client.poll(1)
    return errors, answered


def test_wrong_scram_password_is_refused(kafka: Kafka, ctx: StackContext) -> None:
    errors, answered = _auth_errors(kafka.client_config("accounts", "not-the-password"))
    assert not answered
    assert any(e.code() == KafkaError._AUTHENTICATION for e in errors), errors


@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SASL_PLAINTEXT"])
def test_non_tls_client_gets_nothing(kafka: Kafka, ctx: StackContext, protocol: str) -> None:
    config = {**kafka.client_config("admin", ctx.credentials.kafka["admin"]), "security.protocol": protocol}
    config.pop("ssl.ca.location")
    config.pop("ssl.endpoint.identification.algorithm")
    if protocol == "PLAINTEXT":
        for key in ("sasl.mechanism", "sasl.username", "sasl.password"):
            config.pop(key)
    _, answered = _auth_errors(config)
    assert not answered


def test_plaintext_kafka_request_gets_no_response(ctx: StackContext) -> None:
    """A raw ApiVersions request in the clear: the TLS listener closes the connection without an answer."""
    api_versions = struct.pack(">hhih", 18, 0, 1, 4) + b"test"
    frame = struct.pack(">i", len(api_versions)) + api_versions
    with socket.create_connection(("127.0.0.1", ctx.settings.kafka_port), timeout=5) as conn:
        conn.sendall(frame)
        try:
            reply = conn.recv(4096)
        except (ConnectionResetError, TimeoutError):
            reply = b""
    # Either the connection is closed or the TLS layer answers with an alert record (type 21): never Kafka.
    assert reply == b"" or reply[0] == 21, reply[:16]


def _controller_accepts(ctx: StackContext, cert: Path | None, key: Path | None) -> bool:
    """Handshake with the controller listener and send a partial request.

    Under TLS 1.3 the server checks the client certificate after the handshake: a refusal arrives as a TLS
    alert on the first read. An accepted client instead sees the broker wait for the rest of its request.
    """
    context = ssl.create_default_context(cafile=str(ctx.ca_file))
    if cert and key:
        context.load_cert_chain(cert, key)
    try:
        with (
            socket.create_connection(("127.0.0.1", ctx.settings.kafka_controller_port), timeout=3) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"\x00")
            tls.recv(1)
    except TimeoutError:
        return True
    except (ssl.SSLError, ConnectionResetError):
        return False
    return True


def test_controller_listener_requires_a_client_certificate_from_the_dev_ca(ctx: StackContext, tmp_path: Path) -> None:
    own = ctx.pki.paths("cli")
    assert _controller_accepts(ctx, own.cert, own.key)
    assert not _controller_accepts(ctx, None, None)
    other = DevPki(tmp_path, leaf_days=1, reissue_when_days_left=0)
    other.ensure(["cli"])
    assert not _controller_accepts(ctx, other.paths("cli").cert, other.paths("cli").key)


def test_acl_sync_removes_grants_the_policy_does_not_make(kafka: Kafka, unique: str) -> None:
    stray = AclGrant("audit", "TOPIC", f"it.{unique}.stray", "WRITE")
    admin = kafka.admin()
    admin.grant({stray})
    kafka.bootstrap()
    remaining = admin.client.describe_acls(EVERY_ACL, request_timeout=TIMEOUT).result()
    assert not [b for b in remaining if b.name == stray.resource_name]
    assert any(b.name == "accounts.events.v1" and b.principal == "User:accounts" for b in remaining)


def test_a_principal_gone_from_the_policy_can_no_longer_log_in_and_keeps_no_acl(kafka: Kafka, unique: str) -> None:
    """A service removed or renamed: its old password and its ACLs go at the next `bastion up` (bootstrap)."""
    gone, password = f"it-gone-{unique}", secrets.token_urlsafe(24)
    admin = kafka.admin()
    admin.upsert_scram_users({gone: password})
    admin.grant({AclGrant(gone, "TOPIC", "accounts.events.v1", "READ")})
    deadline = time.monotonic() + 20  # a new SCRAM credential reaches the listener through the metadata log
    while not (logged_in := _auth_errors(kafka.client_config(gone, password)))[1] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert logged_in[1], f"logged in before the policy was applied again: {logged_in[0]}"
    kafka.bootstrap()
    errors, answered = _auth_errors(kafka.client_config(gone, password))
    assert not answered and any(e.code() == KafkaError._AUTHENTICATION for e in errors), errors
    remaining = admin.client.describe_acls(EVERY_ACL, request_timeout=TIMEOUT).result()
    assert not [b for b in remaining if b.principal == f"User:{gone}"]
    _, admin_answered = _auth_errors(kafka.client_config(ADMIN, kafka.ctx.credentials.kafka[ADMIN]))
    assert admin_answered, "the stack's own admin keeps its login"


@pytest.mark.parametrize("service", ["payments", "audit"])
def test_a_service_principal_is_no_super_user_and_cannot_grant_itself_anything(
    kafka: Kafka, ctx: StackContext, unique: str, service: str,
) -> None:
    """Only `User:admin` and the broker are super users: a service's SCRAM principal can neither create a topic
    nor write an ACL, so a stolen service password cannot widen its own access."""
    admin = AdminClient(kafka.client_config(service, ctx.credentials.kafka[service]))

    def refusal(futures: dict[Any, Any]) -> int:
        [future] = futures.values()
        with pytest.raises(KafkaException) as refused:
            future.result(timeout=TIMEOUT)
        return int(refused.value.args[0].code())

    stray = f"it.{unique}.stray"
    assert refusal(admin.create_topics([NewTopic(stray, 1, 1)])) in (
        KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED)
    everything = AclBinding(ResourceType.TOPIC, "*", ResourcePatternType.LITERAL, f"User:{service}", "*",
                            AclOperation.ALL, AclPermissionType.ALLOW)
    assert refusal(admin.create_acls([everything])) == KafkaError.CLUSTER_AUTHORIZATION_FAILED
    operator = kafka.admin()  # User:admin, a super user, sees what is there
    assert not [acl for acl in operator.client.describe_acls(EVERY_ACL).result(timeout=TIMEOUT)
                if acl.principal == f"User:{service}" and acl.name == "*"], "no ACL was written"
    assert stray not in operator.client.list_topics(timeout=TIMEOUT).topics


@pytest.mark.parametrize("service", ["payments", "audit"])
def test_a_service_principal_sees_no_acl_and_only_the_topics_it_is_granted(
    kafka: Kafka, ctx: StackContext, service: str,
) -> None:
    """A stolen service password does not map the broker: DescribeAcls answers with nothing, and the topic list
    holds only the topics the principal has a grant on."""
    admin = AdminClient(kafka.client_config(service, ctx.credentials.kafka[service]))
    operator = kafka.admin().client
    every_acl = operator.describe_acls(EVERY_ACL).result(timeout=TIMEOUT)
    granted = {acl.name for acl in every_acl if acl.principal == f"User:{service}" and
               acl.restype == ResourceType.TOPIC}
    all_topics = set(operator.list_topics(timeout=TIMEOUT).topics)
    assert len(every_acl) > 10 and all_topics - granted, "the broker holds ACLs and topics of other principals"
    assert admin.describe_acls(EVERY_ACL).result(timeout=TIMEOUT) == []
    seen = set(admin.list_topics(timeout=TIMEOUT).topics)
    assert seen and seen <= granted
