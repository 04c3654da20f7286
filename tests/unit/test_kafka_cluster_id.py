"""The KRaft cluster id given to Kafka's storage tool: a 16-byte id in URL-safe base64, never one the tool would
read as an option (a leading "-": about one random id in 64)."""

import base64
import uuid

import pytest

from bastion.devstack.components import kafka


def test_a_cluster_id_is_sixteen_bytes_of_url_safe_base64() -> None:
    cluster_id = kafka.new_cluster_id()
    assert len(cluster_id) == 22 and len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_a_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not any(kafka.new_cluster_id().startswith("-") for _ in range(2_000))
    dashed = uuid.UUID(bytes=base64.urlsafe_b64decode("-" + "A" * 21 + "=="))
    drawn = iter([dashed, dashed, uuid.UUID(int=7)])
    with monkeypatch.context() as patched:
        patched.setattr(kafka.uuid, "uuid4", lambda: next(drawn))
        assert kafka.new_cluster_id() == base64.urlsafe_b64encode(uuid.UUID(int=7).bytes).decode().rstrip("=")
