"""The second witness (bastion/audit/published.py): every checkpoint the audit service published on
audit.checkpoints.v1 must still be a line of the checkpoint file, so a file lost, cut short or replaced fails
`bastion audit verify` instead of reading as fewer checkpoints (or none) to check the log against."""

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from bastion.audit import install_tools, published
from bastion.audit.chain import Head
from bastion.audit.checkpoints import Checkpoint, sign_checkpoint
from bastion.audit.published import WitnessUnavailableError, missing_from_file, read_published
from bastion.events.keys import KeyRing
from tests.unit.audit.samples import AUDIT_KEY, ORIGIN, trust_store

TRUST = trust_store()


def signed(length: int, origin: str = ORIGIN, fill: int = 0) -> Checkpoint:
    return sign_checkpoint(AUDIT_KEY, origin, Head(length, bytes([length + fill]) * 32))


SIGNED = [signed(10), signed(20), signed(30)]


def test_a_file_holding_every_published_checkpoint_lacks_none_even_with_lines_never_published() -> None:
    assert missing_from_file(SIGNED, SIGNED) == []
    assert missing_from_file(SIGNED[:2], SIGNED) == [], "a publication that failed is covered by the next"
    assert missing_from_file([], SIGNED) == []


def test_a_lost_file_a_file_cut_short_or_one_replaced_lacks_what_was_published() -> None:
    assert missing_from_file(SIGNED, []) == SIGNED
    assert missing_from_file(SIGNED, SIGNED[:1]) == SIGNED[1:]
    rewritten = [signed(10, fill=1), signed(20, fill=1), signed(30, fill=1)]  # same lengths, other heads
    assert missing_from_file(SIGNED, rewritten) == SIGNED
    other_key = [Checkpoint(c.origin, c.length, c.head_hash, "audit/other", c.key_hash, c.signature) for c in SIGNED]
    assert missing_from_file(SIGNED, other_key) == SIGNED, "compared whole, the key and signature included"


@pytest.fixture
def ctx(tmp_path: Path) -> Any:
    ring = KeyRing(tmp_path / "keys")
    ring.ensure(["audit"])
    layout = SimpleNamespace(audit_checkpoints_file=tmp_path / "audit" / "checkpoints.jsonl",
                             event_keys_dir=ring.folder)
    return SimpleNamespace(layout=layout)


def test_verify_fails_naming_what_the_file_lacks_before_it_reads_the_log(ctx: Any) -> None:
    # No file at all, as if deleted: without the witness this read as "0 signed checkpoints" and verified.
    verdict = install_tools.verify(ctx, ORIGIN, witness=lambda _ctx, _origin: SIGNED)
    assert not verdict.report.ok
    assert verdict.report.reason.startswith("the checkpoint file lacks 3 of the 3 checkpoints published on "
                                            "audit.checkpoints.v1 (the newest it lacks covers 30 records")


class ReachedTheLog(Exception):
    pass


def test_verify_reads_the_witness_before_the_file_so_a_checkpoint_signed_meanwhile_is_no_false_alarm(
        ctx: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # The audit service appends a checkpoint to its file, then publishes it: read the other way round, one signed
    # between the two reads would be on the topic and not in the file as read, and a sound log would fail.
    def the_service_signs_meanwhile(_ctx: Any, _origin: str) -> list[Checkpoint]:
        path = ctx.layout.audit_checkpoints_file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(checkpoint.to_json() + "\n" for checkpoint in SIGNED))
        return SIGNED

    def reached(_ctx: Any) -> Any:
        raise ReachedTheLog

    monkeypatch.setattr(install_tools, "audit_engine", reached)
    with pytest.raises(ReachedTheLog):  # past the witness: the file held every published checkpoint
        install_tools.verify(ctx, ORIGIN, witness=the_service_signs_meanwhile,
                             file=install_tools.CheckpointFile(ctx.layout.audit_checkpoints_file, TRUST, ORIGIN))


def test_verify_fails_when_the_published_checkpoints_cannot_be_read(ctx: Any) -> None:
    def unreachable(_ctx: Any, _origin: str) -> list[Checkpoint]:
        raise WitnessUnavailableError("audit.checkpoints.v1 could not be read: broker down")

    verdict = install_tools.verify(ctx, ORIGIN, witness=unreachable)
    assert not verdict.report.ok
    assert "cannot be read" in verdict.report.reason and "broker down" in verdict.report.reason


class Record:
    def __init__(self, value: bytes, offset: int) -> None:
        self._value, self._offset = value, offset

    def error(self) -> None:
        return None

    def value(self) -> bytes:
        return self._value

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset


class Topic:
    """Stands in for a Consumer of audit.checkpoints.v1 holding VALUES (one partition)."""

    def __init__(self, values: list[bytes]) -> None:
        self.values = values
        self.assigned: list[Any] = []
        self.closed = False

    def __call__(self, config: dict[str, Any]) -> "Topic":
        assert config["enable.auto.commit"] is False, "an investigator's read commits nothing"
        self.group = config["group.id"]
        return self

    def list_topics(self, topic: str, timeout: float) -> Any:
        return SimpleNamespace(topics={topic: SimpleNamespace(error=None, partitions={0: None})})

    def get_watermark_offsets(self, _place: Any, timeout: float) -> tuple[int, int]:
        return 0, len(self.values)

    def assign(self, places: list[Any]) -> None:
        self.assigned = places
        self.position = 0

    def poll(self, _timeout: float) -> Record | None:
        if self.position >= len(self.values):
            return None
        self.position += 1
        return Record(self.values[self.position - 1], self.position - 1)

    def close(self) -> None:
        self.closed = True


def test_the_topic_is_read_to_its_end_keeping_only_the_origins_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    topic = Topic([SIGNED[0].to_bytes(), signed(15, origin="elsewhere/audit").to_bytes(), SIGNED[1].to_bytes()])
    monkeypatch.setattr(published, "Consumer", topic)
    assert read_published({}, ORIGIN) == SIGNED[:2]
    assert topic.closed


def test_a_record_on_the_topic_that_is_no_checkpoint_makes_the_witness_unreadable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    topic = Topic([SIGNED[0].to_bytes(), b"not a signed note"])
    monkeypatch.setattr(published, "Consumer", topic)
    with pytest.raises(WitnessUnavailableError, match="at offset 1 holds no checkpoint"):
        read_published({}, ORIGIN)
    assert topic.closed


def test_the_topic_is_read_under_the_group_given_or_a_new_one_each_time(monkeypatch: pytest.MonkeyPatch) -> None:
    topic = Topic([SIGNED[0].to_bytes()])
    monkeypatch.setattr(published, "Consumer", topic)
    read_published({}, ORIGIN, group="audit-witness")
    assert topic.group == "audit-witness", "the audit principal may read under the group it was granted only"
    read_published({}, ORIGIN)
    first = topic.group
    read_published({}, ORIGIN)
    assert first.startswith("audit-witness-") and topic.group != first


def test_an_empty_topic_is_no_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(published, "Consumer", Topic([]))
    assert read_published({}, ORIGIN) == []


def test_a_consumer_that_cannot_be_made_leaves_the_witness_unavailable_rather_than_raising_a_kafka_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # librdkafka refuses a configuration at construction (a certificate file gone or unreadable, say): that is the
    # topic not being readable, which VerifyChain turns into a failed verdict and `bastion audit verify` reports.
    def unbuildable(config: dict[str, Any]) -> Any:
        raise KafkaException(KafkaError(KafkaError._INVALID_ARG, "ssl.key.location failed: No such file"))

    monkeypatch.setattr(published, "Consumer", unbuildable)
    with pytest.raises(WitnessUnavailableError, match=r"ssl\.key\.location"):
        read_published({}, ORIGIN, group="audit-witness")
