"""The hash chain and its verifier over in-memory entries: an intact log verifies; every edit, deletion,
swap, truncation and consistent rewrite is found, at the first seq that could be bad."""

from collections.abc import Iterator
from dataclasses import replace

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from bastion.audit.chain import EMPTY, GENESIS_HASH, Head, LogEntry, extend, record_hash
from bastion.audit.checkpoints import Checkpoint, sign_checkpoint
from bastion.audit.errors import ChainBrokenError, CorruptRowError
from bastion.audit.records import AuditRecord
from bastion.audit.verify import check_chain
from tests.unit.audit.samples import AUDIT_KEY, ORIGIN, mixed_records, records

logs = st.lists(records(), min_size=2, max_size=12).map(lambda rs: extend(EMPTY, rs))


def signed(entries: list[LogEntry], *lengths: int) -> list[Checkpoint]:
    heads = {0: EMPTY, **{entry.seq: entry.head for entry in entries}}
    return [sign_checkpoint(AUDIT_KEY, ORIGIN, heads[length]) for length in lengths]


def rehash_from(entries: list[LogEntry], index: int) -> list[LogEntry]:
    """ENTRIES with every entry from INDEX on linked and hashed again: a consistent rewrite."""
    head = entries[index - 1].head if index else EMPTY
    return entries[:index] + extend(head, [entry.record for entry in entries[index:]])


def test_extend_links_each_record_to_the_one_before() -> None:
    first = extend(EMPTY, mixed_records(3))
    more = extend(first[-1].head, mixed_records(2, start=4))
    assert [entry.seq for entry in first + more] == [1, 2, 3, 4, 5]
    assert first[0].prev_hash == GENESIS_HASH
    for before, entry in zip(first + more, (first + more)[1:], strict=False):
        assert entry.prev_hash == before.hash
        assert entry.hash == record_hash(entry.seq, entry.prev_hash, entry.record)


@given(logs, st.data())
def test_an_intact_log_verifies_with_its_checkpoints(entries: list[LogEntry], data: st.DataObject) -> None:
    lengths = sorted(data.draw(st.sets(st.integers(0, len(entries)), max_size=4)))
    report = check_chain(entries, signed(entries, *lengths))
    assert report.ok and report.first_bad_seq is None
    assert (report.length, report.head_hash) == entries[-1].head
    assert report.anchored_length == (lengths[-1] if lengths else 0)
    report.raise_if_broken()


def test_an_empty_log_verifies() -> None:
    report = check_chain([], signed([], 0))
    assert report.ok and (report.length, report.head_hash) == EMPTY


@given(logs, st.data(), records())
def test_an_edited_record_is_found_at_its_seq(entries: list[LogEntry], data: st.DataObject,
                                              other: AuditRecord) -> None:
    index = data.draw(st.integers(0, len(entries) - 1))
    assume(other != entries[index].record)
    entries[index] = replace(entries[index], record=other)
    report = check_chain(entries, [])
    assert not report.ok and report.first_bad_seq == index + 1
    assert report.length == index and "changed" in report.reason


@given(logs, st.data(), records())
def test_an_edited_and_rehashed_record_is_found_by_the_broken_link(entries: list[LogEntry], data: st.DataObject,
                                                                    other: AuditRecord) -> None:
    index = data.draw(st.integers(0, len(entries) - 2))
    assume(other != entries[index].record)
    entry = entries[index]
    entries[index] = replace(entry, record=other, hash=record_hash(entry.seq, entry.prev_hash, other))
    report = check_chain(entries, [])
    assert not report.ok and report.first_bad_seq == index + 1
    assert report.length == index and "does not link" in report.reason


@given(logs, st.data())
def test_a_deleted_record_is_found_at_its_seq(entries: list[LogEntry], data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(entries) - 2))
    del entries[index]
    report = check_chain(entries, [])
    assert not report.ok and report.first_bad_seq == index + 1 and "missing" in report.reason


@given(logs, st.data())
def test_a_deleted_record_with_the_rest_renumbered_is_found_at_its_seq(entries: list[LogEntry],
                                                                        data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(entries) - 2))
    tampered = entries[:index] + [replace(entry, seq=entry.seq - 1) for entry in entries[index + 1:]]
    report = check_chain(tampered, [])
    assert not report.ok and report.first_bad_seq == index + 1


@given(logs, st.data())
def test_two_swapped_records_are_found_at_the_first(entries: list[LogEntry], data: st.DataObject) -> None:
    first, second = sorted(data.draw(st.lists(st.integers(0, len(entries) - 1), min_size=2, max_size=2,
                                              unique=True)))
    assume(entries[first].record != entries[second].record)
    swap_records = data.draw(st.booleans())
    if swap_records:  # the record columns of two rows exchanged, hashes left in place
        a, b = entries[first], entries[second]
        entries[first], entries[second] = replace(a, record=b.record), replace(b, record=a.record)
    else:  # two whole rows exchanged, each taking the other's seq
        a, b = entries[first], entries[second]
        entries[first], entries[second] = replace(b, seq=a.seq), replace(a, seq=b.seq)
    report = check_chain(entries, [])
    assert not report.ok and report.first_bad_seq == first + 1


@given(logs, st.data())
def test_a_truncated_tail_is_found_against_the_last_checkpoint(entries: list[LogEntry], data: st.DataObject) -> None:
    keep = data.draw(st.integers(0, len(entries) - 1))
    checkpoints = signed(entries, len(entries))
    report = check_chain(entries[:keep], checkpoints)
    assert not report.ok and report.first_bad_seq == keep + 1
    assert (report.length, report.head_hash) == (entries[keep - 1].head if keep else EMPTY)
    assert "deleted" in report.reason


def test_a_truncated_tail_without_a_checkpoint_after_it_is_not_detectable() -> None:
    entries = extend(EMPTY, mixed_records(6))
    assert check_chain(entries[:4], signed(entries, 3)).ok


@given(logs, st.data(), records())
def test_a_consistent_rewrite_is_found_one_past_the_last_matching_checkpoint(
        entries: list[LogEntry], data: st.DataObject, other: AuditRecord) -> None:
    lengths = sorted(data.draw(st.sets(st.integers(1, len(entries)), min_size=1, max_size=4)))
    start = data.draw(st.integers(0, lengths[-1] - 1))  # index of the first rewritten record
    assume(other != entries[start].record)
    checkpoints = signed(entries, *lengths)
    entries[start] = replace(entries[start], record=other)
    rewritten = rehash_from(entries, start)
    matching = max((length for length in lengths if length <= start), default=0)
    report = check_chain(rewritten, checkpoints)
    assert not report.ok and report.first_bad_seq == matching + 1
    assert report.length == matching == report.anchored_length
    assert "rewritten" in report.reason and f"length {matching}" in report.reason


def test_a_rewrite_after_the_newest_checkpoint_waits_for_the_next_one() -> None:
    entries = extend(EMPTY, mixed_records(6))
    checkpoints = signed(entries, 3)
    entries[4] = replace(entries[4], record=mixed_records(1, start=99)[0])
    report = check_chain(rehash_from(entries, 4), checkpoints)
    assert report.ok and report.anchored_length == 3 and report.length == 6


def test_a_stored_row_that_is_not_a_record_is_named() -> None:
    entries = extend(EMPTY, mixed_records(5))

    def rows() -> Iterator[LogEntry]:
        yield from entries[:2]
        raise CorruptRowError(3, "kind 'evnet' is not a RecordKind")

    report = check_chain(rows(), [])
    assert not report.ok and report.first_bad_seq == 3 and "not a valid audit record" in report.reason


def test_a_seq_stored_twice_is_named() -> None:
    entries = extend(EMPTY, mixed_records(5))
    report = check_chain([*entries[:3], entries[2], *entries[3:]], [])
    assert not report.ok and report.first_bad_seq == 3 and "more than once" in report.reason


def test_a_checkpoint_of_the_empty_log_must_name_the_genesis_hash() -> None:
    bogus = sign_checkpoint(AUDIT_KEY, ORIGIN, Head(0, b"\x01" * 32))
    report = check_chain(extend(EMPTY, mixed_records(2)), [bogus])
    assert not report.ok and report.first_bad_seq == 1


def test_a_broken_report_raises_when_asked() -> None:
    entries = extend(EMPTY, mixed_records(3))
    report = check_chain(entries[1:], [])
    with pytest.raises(ChainBrokenError, match="seq 1") as caught:
        report.raise_if_broken()
    assert caught.value.first_bad_seq == 1


def test_the_same_head_signed_twice_verifies_as_one_anchor() -> None:
    """A key rotation signs the unchanged head again with the new key: two checkpoints of one length."""
    entries = extend(EMPTY, mixed_records(5))
    report = check_chain(entries, signed(entries, 3, 3, 5))
    assert report.ok and report.anchored_length == 5


def test_checkpoints_verify_in_any_order_they_are_given() -> None:
    entries = extend(EMPTY, mixed_records(6))
    report = check_chain(entries, list(reversed(signed(entries, 2, 4, 6))))
    assert report.ok and report.anchored_length == 6


def test_a_broken_link_right_after_a_checkpoint_blames_the_link_not_the_signed_record() -> None:
    """Record 3 is vouched for by a checkpoint, so a record 4 that does not link to it is the bad one."""
    entries = extend(EMPTY, mixed_records(5))
    entry = entries[3]
    forged_prev = b"\x44" * 32
    entries[3] = replace(entry, prev_hash=forged_prev, hash=record_hash(entry.seq, forged_prev, entry.record))
    report = check_chain(entries, signed(entries[:3], 3))
    assert not report.ok and report.first_bad_seq == 4 and "does not link" in report.reason
    assert (report.length, report.anchored_length) == (3, 3)


def test_a_report_never_counts_the_first_bad_seq_as_verified() -> None:
    """A seq stored again below a checkpoint's length: what verified is what lies below the first bad seq."""
    entries = extend(EMPTY, mixed_records(5))
    report = check_chain([*entries, entries[2]], signed(entries, 3))
    assert not report.ok and report.first_bad_seq == 3
    assert report.anchored_length <= report.length < report.first_bad_seq


def test_a_corrupt_row_after_a_gap_is_reported_at_the_first_missing_seq() -> None:
    entries = extend(EMPTY, mixed_records(5))

    def rows() -> Iterator[LogEntry]:
        yield from entries[:2]  # records 3 and 4 are gone; the row stored for 5 does not parse
        raise CorruptRowError(5, "kind 'evnet' is not a RecordKind")

    report = check_chain(rows(), [])
    assert not report.ok and report.first_bad_seq == 3 and report.length == 2
