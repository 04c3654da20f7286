"""The projections fold: what each projection holds, and that folding batch by batch (as the live tables
are kept) gives exactly what a rebuild from the whole log gives."""

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.audit.chain import EMPTY, LogEntry, extend
from bastion.audit.projections import (
    AccessRow,
    AccessSummaryRow,
    Projections,
    TimelineRow,
    digest_rows,
    plain_row,
)
from bastion.audit.records import AuditRecord
from tests.unit.audit.samples import mixed_records, records, sample_record


def fold(entries: list[LogEntry]) -> Projections:
    projections = Projections()
    for entry in entries:
        projections.apply(entry.seq, entry.record)
    return projections


def test_each_projection_holds_what_it_is_for() -> None:
    entries = extend(EMPTY, [
        sample_record(1, aggregate="acc-a"),
        sample_record(2, "access", principal="alice", decision="allow"),
        sample_record(3, aggregate="acc-b"),
        sample_record(4, "access", principal="alice", decision="deny"),
        sample_record(5, "rejection"),
        sample_record(6, aggregate="acc-a"),
        sample_record(7, "access", principal="bob", decision="allow"),
    ])
    projections = fold(entries)
    assert sorted(projections.timeline) == [("acc-a", 1), ("acc-a", 6), ("acc-b", 3)]
    assert sorted(projections.access) == [("alice", 2), ("alice", 4), ("bob", 7)]
    assert projections.summary == {"alice": AccessSummaryRow("alice", 1, 1, 4), "bob": AccessSummaryRow("bob", 1, 0, 7)}
    assert sorted(projections.security) == [4, 5], "the denied call and the rejected event"
    assert projections.security[5].principal == "notifications" and projections.security[5].reason == "bad_signature"


@given(st.lists(records(), max_size=30), st.data())
def test_folding_batch_by_batch_equals_a_rebuild_from_the_whole_log(log: list[AuditRecord],
                                                                    data: st.DataObject) -> None:
    entries = extend(EMPTY, log)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(entries)), max_size=4)))
    live = Projections()
    for start, end in zip([0, *cuts], [*cuts, len(entries)], strict=True):
        live.merge(fold(entries[start:end]))
    rebuilt = fold(entries)
    assert live.dump() == rebuilt.dump()
    assert live.digests() == rebuilt.digests()


def test_a_dump_is_plain_values_in_key_order_and_its_digest_sees_every_change() -> None:
    projections = fold(extend(EMPTY, mixed_records(40)))
    dump = projections.dump()
    assert set(dump) == {"timeline", "access_log", "access_summary", "security_view"}
    for rows in dump.values():
        assert rows == sorted(rows)
        assert all(isinstance(value, str | int | type(None)) for row in rows for value in row)
    other = fold(extend(EMPTY, mixed_records(39)))
    assert other.digests()["timeline"] != projections.digests()["timeline"]
    assert plain_row([dt.datetime(2026, 1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1))), 3, None]) == (
        "2026-01-01T00:00:00.000000Z", 3, None)
    assert digest_rows([]) == digest_rows(iter([]))


def test_the_security_view_keeps_each_refusals_detail_which_the_peer_rules_count_by() -> None:
    projections = fold(extend(EMPTY, [sample_record(1, "access", decision="deny"), sample_record(2, "rejection")]))
    assert projections.security[1].detail == "spiffe://bastion.local/service/gateway"
    assert projections.security[2].detail == "signature does not verify"


def test_an_event_of_no_aggregate_has_no_timeline() -> None:
    projections = fold(extend(EMPTY, [sample_record(1, aggregate=""), sample_record(2, aggregate="acc-a")]))
    assert sorted(projections.timeline) == [("acc-a", 2)]


def test_a_timeline_row_names_its_event_and_an_access_row_the_service_that_decided() -> None:
    event, access = extend(EMPTY, [sample_record(1, aggregate="acc-a"), sample_record(2, "access", decision="deny")])
    projections = fold([event, access])
    assert projections.timeline[("acc-a", 1)] == TimelineRow(
        "acc-a", 1, "bastion.accounts.v1.MoneyDeposited", "accounts", event.record.event_id, "corr-1",
        event.record.occurred_at)
    assert projections.access[("alice", 2)] == AccessRow(
        "alice", 2, "/bastion.accounts.v1.Accounts/GetAccount", "deny", "not_owner", "accounts", "corr-2",
        access.record.occurred_at)


def test_summaries_of_batches_folded_apart_add_up() -> None:
    entries = extend(EMPTY, [sample_record(1, "access", decision="allow"), sample_record(2, "access", decision="deny"),
                             sample_record(3, "access", decision="deny")])
    live = fold(entries[:1])
    live.merge(fold(entries[1:2]))
    live.merge(fold(entries[2:]))
    assert live.summary == {"alice": AccessSummaryRow("alice", 1, 2, 3)}


def test_a_value_no_projection_column_holds_is_refused() -> None:
    with pytest.raises(TypeError, match="unexpected projection value"):
        plain_row(["text", b"bytes"])
