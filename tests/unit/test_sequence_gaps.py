"""The pure parts of reporting a sequence gap that stayed open: the consumer's wait, the place of a held event, and
the form the held table keeps (the database part is in tests/integration/test_signed_events.py)."""

import datetime as dt
from dataclasses import dataclass

import pytest
from sqlalchemy import create_engine, select

from bastion.accounts.v1.events_pb2 import AccountOpened
from bastion.events.consumer import MAX_GAP_CHECK_SECONDS, ConsumerSettings, place_in, source_of
from bastion.events.inbox import HELD_BUNDLE, Admission, HeldAggregate, OpenGap, admit, record, unwrap_held
from bastion.events.storage import EVENTS_METADATA, held
from bastion.events.v1.envelope_pb2 import Envelope
from bastion.events.verify import VerifiedEvent
from bastion.settings import DevstackSettings


@dataclass
class Record:
    partition_: int = 3
    offset_: int = 1234

    def topic(self) -> str:
        return "accounts.events.v1"

    def partition(self) -> int:
        return self.partition_

    def offset(self) -> int:
        return self.offset_


def test_the_place_of_a_held_event_reads_back_from_its_source() -> None:
    assert place_in(source_of(Record())) == (3, 1234, None)  # type: ignore[arg-type]
    assert place_in(source_of(Record(0, 0), item=7)) == (0, 0, 7)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "source", [None, "", "accounts.events.v1", "t/x/1", "t/1/2/3/released/4", "t/-1/2", "t/\u0661/2"]
)
def test_an_unknown_or_odd_source_gives_no_place(source: str | None) -> None:
    assert place_in(source) == (-1, -1, None)


def test_the_held_form_unwraps_to_what_was_held() -> None:
    assert unwrap_held(b"\x0a\x03abc") == (b"\x0a\x03abc", False)
    assert unwrap_held(HELD_BUNDLE + b"\x0a\x03abc") == (b"\x0a\x03abc", True)


def test_the_consumer_looks_for_open_gaps_a_quarter_of_its_wait_apart_at_most() -> None:
    assert ConsumerSettings("notifications", "g", ["t"]).gap_alert_seconds == \
        DevstackSettings.model_fields["sequence_gap_alert_seconds"].default
    assert ConsumerSettings("notifications", "g", ["t"], gap_alert_seconds=2).gap_check_seconds == 0.5
    assert ConsumerSettings("notifications", "g", ["t"], gap_alert_seconds=3600).gap_check_seconds == \
        MAX_GAP_CHECK_SECONDS


@pytest.mark.parametrize("seconds", [0, -1, 86_401])
def test_a_wait_that_would_never_or_always_report_is_refused(seconds: float) -> None:
    with pytest.raises(ValueError, match="gap_alert_seconds"):
        ConsumerSettings("notifications", "g", ["t"], gap_alert_seconds=seconds)


def test_the_longest_wait_is_a_day() -> None:
    assert ConsumerSettings("notifications", "g", ["t"], gap_alert_seconds=86_400).gap_alert_seconds == 86_400


def test_a_gap_names_every_sequence_missing_before_the_first_held_event() -> None:
    def gap(missing: int, first_held: int) -> OpenGap:
        return OpenGap("accounts", "a", missing, first_held, None, b"", "t", dt.datetime.now(dt.UTC), 1, False)

    assert gap(2, 3).missing_range == "sequence 2"
    assert gap(2, 5).missing_range == "sequences 2 to 4"


def test_an_operator_reads_which_sequences_an_aggregate_waits_for() -> None:
    def waiting(last_applied: int, first_held: int) -> str:
        return HeldAggregate("accounts", "a", "t", last_applied, first_held, 1, dt.datetime.now(dt.UTC),
                             None).waiting_for

    assert waiting(1, 3) == "sequence 2"
    assert waiting(1, 6) == "sequences 2 to 5"


def _verified(producer: str, sequence: int, event_id: str, aggregate_id: str = "a1") -> VerifiedEvent:
    return VerifiedEvent(Envelope(event_id=event_id, producer=producer, aggregate_id=aggregate_id,
                                  sequence=sequence, topic="accounts.events.v1"), AccountOpened())


def test_each_producer_keeps_its_own_sequence_for_an_aggregate_id() -> None:
    """Two producers may name the same aggregate id: neither one's events read as a replay of, or block, the
    other's (the sequence row is per producer and aggregate)."""
    engine = create_engine("sqlite://")
    EVENTS_METADATA.create_all(engine)
    with engine.begin() as conn:
        for event in (_verified("accounts", 1, "e1"), _verified("payments", 1, "e2"), _verified("accounts", 2, "e3")):
            assert admit(conn, event) is Admission.APPLY, event.envelope
            record(conn, event)
        assert admit(conn, _verified("payments", 1, "e4")) is Admission.REPLAY


def test_an_id_seen_is_a_duplicate_a_sequence_not_above_the_last_a_replay_and_a_gap_holds() -> None:
    """(Also covered, end to end, by tests/integration/test_signed_events.py; this runs without a database server.)"""
    engine = create_engine("sqlite://")
    EVENTS_METADATA.create_all(engine)
    with engine.begin() as conn:
        first, second = _verified("accounts", 1, "e1"), _verified("accounts", 2, "e2")
        assert admit(conn, first) is Admission.APPLY
        record(conn, first)
        assert admit(conn, first) is Admission.DUPLICATE
        assert admit(conn, _verified("accounts", 1, "e1-again")) is Admission.REPLAY  # same sequence, new id
        early = _verified("accounts", 3, "e3")
        assert admit(conn, early, source="accounts.events.v1/0/9") is Admission.HELD
        [(form, source)] = conn.execute(select(held.c.envelope, held.c.source)).all()
        assert (bytes(form), source) == (early.envelope.SerializeToString(), "accounts.events.v1/0/9")
        assert admit(conn, second) is Admission.APPLY
        record(conn, second)
        assert admit(conn, _verified("accounts", 2, "e2-again")) is Admission.REPLAY
        assert admit(conn, _verified("accounts", 0, "e0")) is Admission.REPLAY
