"""Retiring a signing key on a running stack: `bastion keys retire` waits for every consumer group of the
producer's topics to read what was written before it (`KafkaAdmin.wait_until_read`), then retires, and the
platform goes on under the new key without a restart. The audit key too: the audit service signs its log's head
with the new key at once, so the old key's checkpoints are superseded, the log still verifies, and the service
goes on signing, also after a restart."""

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer

from bastion.audit.checkpoints import CheckpointFile
from bastion.audit.install_tools import ORIGIN
from bastion.devstack.components.kafka import Kafka
from bastion.devstack.context import StackContext
from bastion.devstack.event_access import EventAccessPolicy, TopicPolicy
from bastion.devstack.process import ProcessSupervisor
from bastion.events.keys import KeyRing
from bastion.payments.v1 import payments_pb2
from tests.integration.bank import Bank, signed_events
from tests.integration.conftest import bastion


@pytest.fixture()
def scratch_topic(stack: Any, ctx: StackContext) -> Iterator[tuple[str, str]]:
    """A topic of the test's own (accounts writes, notifications reads as a group of the test's own)."""
    topic, group = f"retire-it.{uuid.uuid4().hex[:12]}.v1", f"retire-it-{uuid.uuid4().hex[:12]}"
    access = EventAccessPolicy({topic: TopicPolicy(topic, 2, ("accounts",), {"notifications": group})})
    admin = Kafka(ctx).admin()
    admin.ensure_topics(access)
    admin.grant(access.grants())
    yield topic, group
    admin.revoke(access.grants())
    admin.client.delete_topics([topic])


def test_a_group_that_has_not_read_everything_is_named_until_it_has(
    ctx: StackContext, scratch_topic: tuple[str, str]
) -> None:
    topic, group = scratch_topic
    kafka = Kafka(ctx)
    admin = kafka.admin()
    assert admin.wait_until_read({topic: (group,)}, 0) == [], "an empty topic has nothing to read"
    producer = Producer(kafka.client_config("accounts", ctx.credentials.kafka["accounts"]))
    for n in range(4):
        producer.produce(topic, value=b"event", partition=n % 2)
    producer.flush(10)
    assert sorted(admin.wait_until_read({topic: (group,)}, 1)) == [f"{group} on {topic}/0", f"{group} on {topic}/1"]
    reader = Consumer({**kafka.client_config("notifications", ctx.credentials.kafka["notifications"]),
                       "group.id": group, "auto.offset.reset": "earliest", "enable.auto.commit": False})
    reader.subscribe([topic])
    try:
        read = 0
        while read < 4:
            message = reader.poll(1)
            if message is not None and message.error() is None:
                read += 1
        reader.commit(asynchronous=False)
    finally:
        reader.close()
    assert admin.wait_until_read({topic: (group,)}, 10) == []


def test_retire_waits_for_the_consumers_then_the_platform_goes_on_under_the_new_key(ctx: StackContext) -> None:
    ring = KeyRing(ctx.layout.event_keys_dir)
    old = ring.signing_key("payments").key_id
    rotated = bastion("keys", "rotate", "payments")
    assert rotated.returncode == 0, rotated.stderr
    new = ring.signing_key("payments").key_id
    assert bastion("keys", "retire", "payments", new).returncode == 2, "the active key is never retired"
    retired = bastion("keys", "retire", "payments", old, env={"COLUMNS": "300"})
    assert retired.returncode == 0, retired.stdout + retired.stderr
    assert ring.state("payments", old) == "retired"
    bank = Bank.connect(ctx)
    source, target = bank.open_account("alice", amount=1_000), bank.open_account("bob")
    request = payments_pb2.TransferRequest(idempotency_key=f"retire-{uuid.uuid4()}", from_account_id=source,
                                           to_account_id=target, amount_minor=100, currency="EUR")
    payment = bank.payments.Transfer(request, metadata=bank.as_user("alice"), timeout=30).payment
    assert payment.status == "COMPLETED", payment
    [event] = signed_events(ctx, ["payments.events.v1"], lambda e: getattr(e.payload, "payment_id", "")
                            == payment.payment_id, count=1)
    assert event.envelope.key_id == new, "payments signs with its new key without a restart"


def checkpoints(ctx: StackContext) -> CheckpointFile:
    file = CheckpointFile(ctx.layout.audit_checkpoints_file, KeyRing(ctx.layout.event_keys_dir).trust_store(), ORIGIN)
    file.load()
    return file


def test_the_audit_key_retires_its_checkpoints_are_superseded_and_the_log_still_verifies(ctx: StackContext) -> None:
    ring = KeyRing(ctx.layout.event_keys_dir)
    bank = Bank.connect(ctx)
    bank.open_account("alice")  # records for the log, so that the old key has signed something
    old = ring.signing_key("audit").key_id
    deadline = time.monotonic() + 60
    while not any(checkpoint.key_id == old for checkpoint in checkpoints(ctx).load()):
        assert time.monotonic() < deadline, "the audit service never signed a checkpoint"
        time.sleep(1)
    assert bastion("keys", "rotate", "audit").returncode == 0
    new = ring.signing_key("audit").key_id
    retired = bastion("keys", "retire", "audit", old, env={"COLUMNS": "300"})
    assert retired.returncode == 0, retired.stdout + retired.stderr
    after = checkpoints(ctx)
    superseded = {checkpoint.key_id for checkpoint in after.superseded}
    # Only retired keys' checkpoints are superseded: this one's, and those of keys retired by earlier runs when the
    # test install is reused.
    assert old in superseded and all(ring.state("audit", key_id) == "retired" for key_id in superseded), superseded
    assert after.last is not None and after.last.key_id == new, "the new key vouches for the whole log"
    verified = bastion("audit", "verify", env={"COLUMNS": "300"})
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"{len(after.superseded)} checkpoints of retired audit keys superseded" in verified.stdout

    # The service goes on signing with its new key, also once restarted (it reads the file afresh then).
    assert ProcessSupervisor(ctx.layout).stop("audit")
    result = bastion("up")
    assert result.returncode == 0, result.stdout + result.stderr
    signed = after.last.length
    bank.open_account("bob")
    deadline = time.monotonic() + 60
    while (last := checkpoints(ctx).last) is None or last.length <= signed:
        assert time.monotonic() < deadline, "the restarted audit service signed nothing new"
        time.sleep(1)
    assert last.key_id == new
    assert bastion("audit", "verify").returncode == 0
