"""The hash chain: each entry's hash covers its sequence number, the previous entry's hash and its record.

    hash(seq) = SHA-256(RECORD_TAG || seq as 8 bytes big-endian || prev_hash || canonical_bytes(record))

with `prev_hash` of entry 1 the 32 zero bytes of `GENESIS_HASH`. Sequence numbers start at 1 and have no
gaps, so a log's length is its last seq and its head hash is that entry's hash (`GENESIS_HASH` when empty).
The domain tag keeps these hashes apart from every other SHA-256 in the platform; the seq inside the hash
makes a moved record fail even if its bytes are intact.
"""

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from bastion.audit.records import AuditRecord, canonical_bytes

RECORD_TAG = b"bastion.audit.v1.record\x00"
HASH_BYTES = 32
GENESIS_HASH = bytes(HASH_BYTES)


class Head(NamedTuple):
    """A log's length and the hash of its last entry."""

    length: int
    hash: bytes


EMPTY = Head(0, GENESIS_HASH)


class Appended(NamedTuple):
    """Where an appended record landed."""

    seq: int
    hash: bytes


@dataclass(frozen=True)
class LogEntry:
    """A record at its place in the chain, as stored."""

    seq: int
    record: AuditRecord
    prev_hash: bytes
    hash: bytes

    @property
    def head(self) -> Head:
        return Head(self.seq, self.hash)


def record_hash(seq: int, prev_hash: bytes, record: AuditRecord) -> bytes:
    """The chain hash of RECORD stored at SEQ after an entry whose hash is PREV_HASH."""
    return hashlib.sha256(RECORD_TAG + seq.to_bytes(8, "big") + prev_hash + canonical_bytes(record)).digest()


def extend(head: Head, records: Iterable[AuditRecord]) -> list[LogEntry]:
    """The entries that append RECORDS, in order, to a log whose head is HEAD."""
    entries = []
    seq, prev_hash = head
    for record in records:
        seq += 1
        digest = record_hash(seq, prev_hash, record)
        entries.append(LogEntry(seq, record, prev_hash, digest))
        prev_hash = digest
    return entries
