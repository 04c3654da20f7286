"""Before a key is retired: how many events of a topic still wait in a producer's outbox (the outbox on SQLite,
a stand-in for the stack that says PostgreSQL runs), and how long the audit key's retirement waits for a
newer checkpoint (the real checkpoint file and key ring). The rest needs a running stack
(tests/integration/test_key_retirement.py, test_personal_data_flow.py)."""

import datetime as dt
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, insert, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.schema import CreateTable

from bastion.audit.chain import Head
from bastion.audit.checkpoints import sign_checkpoint
from bastion.audit.install_tools import ORIGIN
from bastion.devstack import retirement
from bastion.devstack.errors import DevstackError
from bastion.devstack.event_access import load_policy
from bastion.devstack.layout import StateLayout
from bastion.events.keys import KeyRing
from bastion.events.storage import outbox

TOPIC = "accounts.events.v1"


INFRA = Path(__file__).resolve().parents[2] / "infra"


def stack(healthy: bool = True, kafka: bool = False) -> Any:
    """What the retirement checks read of a Stack: which components are healthy, and the install's context."""
    ctx = SimpleNamespace(settings=SimpleNamespace(public_host="localhost", postgres_port=15432, infra_dir=INFRA),
                          ca_file=Path("ca.pem"), credentials=SimpleNamespace(postgres={"accounts": "pw"}),
                          service_names=["accounts", "audit", "notifications", "payments"])
    components = {"postgres": {"healthy": healthy}, "kafka": {"healthy": kafka}}
    return SimpleNamespace(status=lambda: {"components": components}, context=lambda: ctx)


@pytest.fixture()
def database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Engine:
    """The producer's outbox, where `unpublished_by` looks for it (SQLite in a file: it outlives a dispose)."""
    engine = create_engine(f"sqlite:///{tmp_path / 'accounts.db'}")
    with engine.begin() as conn:
        conn.exec_driver_sql(
            str(CreateTable(outbox).compile(dialect=sqlite.dialect())).replace("id BIGINT", "id INTEGER"))
    monkeypatch.setattr(retirement, "create_engine", lambda _url: engine)
    return engine


def written(engine: Engine, event_id: str, topic: str = TOPIC, sent: bool = False) -> None:
    with engine.begin() as conn:
        conn.execute(insert(outbox).values(event_id=event_id, topic=topic, partition_key="k", envelope=b"e",
                                           sent_at=dt.datetime.now(dt.UTC) if sent else None))


def test_only_the_topic_s_events_not_yet_published_are_counted(database: Engine) -> None:
    written(database, "e1")
    written(database, "e2")
    written(database, "e3", sent=True)
    written(database, "e4", topic="accounts.events.v1.dlq")
    assert retirement.unpublished_by(stack(), "accounts", TOPIC, wait_seconds=0) == 2


def test_the_count_waits_for_a_relay_that_publishes_meanwhile(database: Engine) -> None:
    written(database, "e1")

    def relay() -> None:
        time.sleep(0.2)
        with database.begin() as conn:
            conn.execute(update(outbox).values(sent_at=dt.datetime.now(dt.UTC)))

    publisher = threading.Thread(target=relay)
    publisher.start()
    try:
        assert retirement.unpublished_by(stack(), "accounts", TOPIC, wait_seconds=10) == 0
    finally:
        publisher.join()


def test_without_a_healthy_postgresql_nobody_can_tell(database: Engine) -> None:
    with pytest.raises(DevstackError, match=r"whether accounts has published every event of accounts\.events\.v1: "
                                            "PostgreSQL is not running"):
        retirement.unpublished_by(stack(healthy=False), "accounts", TOPIC, wait_seconds=0)


def test_the_audit_key_s_retirement_waits_its_time_for_a_newer_checkpoint_then_says_why_not(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path / "state")
    ring = KeyRing(layout.event_keys_dir)
    ring.ensure(["audit"])
    old = ring.signing_key("audit")
    layout.audit_checkpoints_file.parent.mkdir(parents=True, exist_ok=True)
    layout.audit_checkpoints_file.write_text(sign_checkpoint(old, ORIGIN, Head(4, b"\x04" * 32)).to_json() + "\n")
    ring.rotate("audit")
    started = time.monotonic()
    reason = retirement.unanchored_if_retired(layout, old.key_id, wait_seconds=0.3, poll_seconds=0.05)
    assert reason is not None and "no later checkpoint of a trusted audit key covers it" in reason
    assert time.monotonic() - started >= 0.3
    with layout.audit_checkpoints_file.open("a") as file:
        file.write(sign_checkpoint(ring.signing_key("audit"), ORIGIN, Head(4, b"\x04" * 32)).to_json() + "\n")
    assert retirement.unanchored_if_retired(layout, old.key_id, wait_seconds=0.3, poll_seconds=0.05) is None


def test_what_the_consumers_have_not_read_is_asked_of_the_groups_that_read_the_producer_s_topics(
        monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[dict[str, tuple[str, ...]], float]] = []

    class Kafka:
        """The broker's admin, as far as the retirement check goes: the question it was asked."""

        def __init__(self, _ctx: Any) -> None:
            pass

        def admin(self) -> Any:
            return SimpleNamespace(wait_until_read=lambda groups, wait: asked.append((groups, wait)) or ["g on t/0"])

    monkeypatch.setattr(retirement, "Kafka", Kafka)
    assert retirement.unread_by_consumers(stack(kafka=True), "accounts", wait_seconds=2.5) == ["g on t/0"]
    expected = load_policy(INFRA / "event-access.yaml", set(stack().context().service_names)).readers_of("accounts")
    assert asked == [(expected, 2.5)] and expected


def test_without_a_healthy_kafka_nobody_can_tell_what_the_consumers_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retirement, "Kafka", None)  # never reached
    with pytest.raises(DevstackError, match="whether every consumer has read what accounts signed: Kafka is not"):
        retirement.unread_by_consumers(stack(healthy=True, kafka=False), "accounts")
