"""The chain verifier: walks the log once, in seq order, and checks it against the signed checkpoints.

It holds one entry at a time, so a log of any length verifies in constant memory when the entries come
from a streaming source (`AuditLog.iter_rows`). What it finds, and the `first_bad_seq` it reports (the
first seq that the evidence shows could be bad):
- a record changed in place: its recomputed hash differs from the stored one: that seq;
- a record deleted: the seq after the last good one is missing: that seq;
- records swapped or moved: the seq is part of the hash, so the first moved record fails: its seq;
- a record changed and re-hashed, with the next record's link left alone: the link breaks; the changed
  record is reported (it is the earlier of the two ends of the broken link);
- the tail truncated: the log ends below the length of a signed checkpoint: one past the log's end;
- the chain rewritten and re-hashed consistently: only a checkpoint can tell. At a checkpoint's length the
  recomputed hash differs from the signed head hash; every record after the last checkpoint that still
  matches may have been rewritten, so the report names the seq one past that checkpoint.
A rewrite after the newest checkpoint is not detectable until the next checkpoint is signed: that window
(`length - anchored_length`) is what the checkpoint interval bounds.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bastion.audit.chain import EMPTY, GENESIS_HASH, Head, LogEntry, record_hash
from bastion.audit.checkpoints import Checkpoint
from bastion.audit.errors import ChainBrokenError, CorruptRowError


@dataclass(frozen=True)
class ChainReport:
    """The verdict on a log.

    `length` and `head_hash` describe the longest prefix that verified (the whole log when `ok`);
    `first_bad_seq` is None when `ok`; `anchored_length` is the length of the newest checkpoint the log
    matched (records after it are hash-chained but not yet covered by a signature); `reason` says what was
    found, in words for an operator.
    """

    ok: bool
    length: int
    head_hash: bytes
    first_bad_seq: int | None
    reason: str
    anchored_length: int

    def raise_if_broken(self) -> None:
        """Raise ChainBrokenError unless the log verified."""
        if not self.ok:
            raise ChainBrokenError(self.first_bad_seq or 0, self.reason)


class _Walk:
    """The verifier's state: the verified prefix, the one before it, and the newest matching checkpoint."""

    def __init__(self) -> None:
        self.last = EMPTY
        self.before_last = EMPTY
        self.anchored = EMPTY

    def prefix_before(self, seq: int) -> Head:
        """The verified head just below SEQ (SEQ is at most one past the verified prefix)."""
        if seq > self.last.length:
            return self.last
        if seq > self.before_last.length:
            return self.before_last
        return self.anchored if self.anchored.length < seq else EMPTY

    def broken(self, seq: int, reason: str) -> ChainReport:
        prefix = self.prefix_before(seq)
        return ChainReport(False, prefix.length, prefix.hash, seq, reason, min(self.anchored.length, prefix.length))


def check_chain(entries: Iterable[LogEntry], checkpoints: Sequence[Checkpoint]) -> ChainReport:
    """Verify ENTRIES (in seq order) against CHECKPOINTS. The checkpoints must be accepted ones (from
    `CheckpointFile.load` or `verify_checkpoint`): this function trusts their signatures.

    ENTRIES may raise CorruptRowError for a row that does not read back as a record; the report names it.
    """
    signed = sorted(checkpoints, key=lambda checkpoint: checkpoint.length)
    walk = _Walk()
    pending = 0  # index of the next checkpoint to compare
    while pending < len(signed) and signed[pending].length == 0:
        if signed[pending].head_hash != GENESIS_HASH:
            return walk.broken(1, "a checkpoint of the empty log names a head hash other than the genesis hash")
        pending += 1
    try:
        for entry in entries:
            expected = walk.last.length + 1
            if entry.seq > expected:
                return walk.broken(expected, f"record {expected} is missing (the next stored record is {entry.seq})")
            if entry.seq < expected:
                return walk.broken(entry.seq, f"record {entry.seq} is stored more than once")
            if record_hash(entry.seq, entry.prev_hash, entry.record) != entry.hash:
                return walk.broken(entry.seq, f"record {entry.seq} does not match its hash: it was changed")
            if entry.prev_hash != walk.last.hash:
                if walk.last.length > walk.anchored.length:
                    return walk.broken(walk.last.length, (
                        f"record {entry.seq} does not link to record {walk.last.length}: record "
                        f"{walk.last.length} was changed and re-hashed, or the link of {entry.seq} was changed"))
                return walk.broken(entry.seq, f"record {entry.seq} does not link to the record before it")
            walk.before_last, walk.last = walk.last, entry.head
            while pending < len(signed) and signed[pending].length == entry.seq:
                if signed[pending].head_hash != entry.hash:
                    return walk.broken(walk.anchored.length + 1, (
                        f"the log was rewritten: its hash at length {entry.seq} differs from the signed checkpoint "
                        f"for that length; the newest checkpoint it still matches is at length "
                        f"{walk.anchored.length}, so any record after it may have been rewritten"))
                walk.anchored = walk.last
                pending += 1
    except CorruptRowError as error:
        seq = min(error.seq, walk.last.length + 1)
        return walk.broken(seq, f"record {error.seq} is not a valid audit record ({error.detail})")
    if pending < len(signed):
        signed_length = signed[-1].length
        return walk.broken(walk.last.length + 1, (
            f"the log ends at length {walk.last.length} but a checkpoint was signed at length {signed_length}: "
            f"records {walk.last.length + 1} to {signed_length} were deleted"))
    return ChainReport(True, walk.last.length, walk.last.hash, None,
                       f"{walk.last.length} records verified, the first {walk.anchored.length} covered by a "
                       f"signed checkpoint", walk.anchored.length)
