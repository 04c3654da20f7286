"""Which partition a record goes to, worked out by the relay itself: a bundle must hold only events of one
partition, and each aggregate must keep the partition (and so the order) its events always had.

`partition_for` is librdkafka's default partitioner (`consistent_random`: CRC-32 of the key, modulo the number of
partitions), which placed every keyed record before the relay sent bundles; an integration test checks the two
agree on the real broker."""

import zlib
from collections.abc import Callable, Iterable
from typing import TypeVar

Item = TypeVar("Item")


def partition_for(key: bytes, partitions: int) -> int:
    if partitions < 1:
        raise ValueError(f"a topic has at least one partition, not {partitions}")
    return zlib.crc32(key) % partitions


def by_partition(items: Iterable[Item], key: Callable[[Item], bytes], partitions: int) -> dict[int, list[Item]]:
    """ITEMS grouped by the partition of their key, each group in the order the items came."""
    groups: dict[int, list[Item]] = {}
    for item in items:
        groups.setdefault(partition_for(key(item), partitions), []).append(item)
    return groups
