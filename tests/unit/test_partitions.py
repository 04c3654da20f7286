"""The relay's own choice of partition and its bundles: librdkafka's consistent partitioner, groups kept in order,
and bundles cut below Kafka's largest record."""

import zlib
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.events.outbox import BUNDLE_BUDGET, STAMP_BYTES, in_bundles
from bastion.events.partitions import by_partition, partition_for
from bastion.events.verify import MAX_ENVELOPE_BYTES


@dataclass(frozen=True)
class Row:
    id: int
    topic: str
    partition_key: str
    envelope: bytes


def test_the_partition_is_the_crc32_of_the_key_modulo_the_partitions() -> None:
    assert partition_for(b"", 3) == 0
    assert partition_for(b"acc-1", 3) == zlib.crc32(b"acc-1") % 3
    assert [partition_for(f"acc-{n}".encode(), 1) for n in range(5)] == [0] * 5
    with pytest.raises(ValueError, match="at least one partition"):
        partition_for(b"k", 0)


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d", "e"]), st.integers()), max_size=40))
def test_groups_keep_the_order_of_their_items(items: list[tuple[str, int]]) -> None:
    groups = by_partition(items, lambda item: item[0].encode(), 3)
    assert sorted(item for group in groups.values() for item in group) == sorted(items)
    for partition, group in groups.items():
        assert [item for item in items if partition_for(item[0].encode(), 3) == partition] == group


@given(st.lists(st.tuples(st.sampled_from(["t1", "t2"]), st.sampled_from(["a", "b", "c"]),
                          st.integers(1, BUNDLE_BUDGET // 3)), min_size=1, max_size=30))
def test_bundles_hold_one_partition_each_in_order_and_stay_within_the_budget(
        specs: list[tuple[str, str, int]]) -> None:
    rows = [Row(number, topic, key, bytes(size)) for number, (topic, key, size) in enumerate(specs)]
    partitions = {"t1": 3, "t2": 2}
    bundles = in_bundles(rows, partitions)
    assert sorted(row.id for _, _, group in bundles for row in group) == [row.id for row in rows]
    for topic, partition, group in bundles:
        assert group, "no empty bundle"
        assert {(row.topic, partition_for(row.partition_key.encode(), partitions[row.topic])) for row in group} == {
            (topic, partition)}
        assert [row.id for row in group] == sorted(row.id for row in group)
        assert len(group) == 1 or sum(len(row.envelope) + STAMP_BYTES for row in group) <= BUNDLE_BUDGET
    # Within a partition, bundles follow each other in the order of their rows.
    for place in {(topic, partition) for topic, partition, _ in bundles}:
        ids = [row.id for topic, partition, group in bundles if (topic, partition) == place for row in group]
        assert ids == sorted(ids)


def test_a_group_over_the_budget_is_cut_into_several_bundles() -> None:
    rows = [Row(number, "t", "same-key", bytes(BUNDLE_BUDGET // 2)) for number in range(5)]
    bundles = in_bundles(rows, {"t": 3})
    assert [[row.id for row in group] for _, _, group in bundles] == [[0], [1], [2], [3], [4]]
    small = [Row(number, "t", "same-key", bytes(100)) for number in range(1000)]
    assert len(in_bundles(small, {"t": 3})) == 1


def test_a_row_too_large_for_a_consumer_goes_alone_so_only_it_is_refused() -> None:
    rows = [Row(0, "t", "k", bytes(100)), Row(1, "t", "k", bytes(MAX_ENVELOPE_BYTES)), Row(2, "t", "k", bytes(100)),
            Row(3, "t", "k", bytes(100))]
    assert [[row.id for row in group] for _, _, group in in_bundles(rows, {"t": 1})] == [[0], [1], [2, 3]]


def test_a_row_of_exactly_the_size_consumers_accept_is_bundled_and_rows_of_exactly_the_budget_make_one_bundle() -> None:
    at_limit = [
        Row(0, "t", "k", bytes(100)),
        Row(1, "t", "k", bytes(MAX_ENVELOPE_BYTES - STAMP_BYTES)),
        Row(2, "t", "k", bytes(100)),
    ]
    assert [[row.id for row in group] for _, _, group in in_bundles(at_limit, {"t": 1})] == [[0, 1, 2]]
    assert BUNDLE_BUDGET % 12 == 0 and BUNDLE_BUDGET // 12 <= MAX_ENVELOPE_BYTES
    full = [Row(number, "t", "k", bytes(BUNDLE_BUDGET // 12 - STAMP_BYTES)) for number in range(13)]
    assert [[row.id for row in group] for _, _, group in in_bundles(full, {"t": 1})] == [list(range(12)), [12]]
