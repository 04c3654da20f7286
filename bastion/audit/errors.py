"""The audit store's typed errors: one hierarchy, so a caller can catch `AuditError` or exactly one case."""


class AuditError(Exception):
    """Base of the audit store's errors."""


class InvalidRecordError(AuditError, ValueError):
    """An audit record that cannot be stored as given (naive timestamp, NUL in a string, missing field)."""


class CorruptRowError(AuditError):
    """A stored row that does not even read back as an audit record (a column tampered into nonsense)."""

    def __init__(self, seq: int, detail: str) -> None:
        super().__init__(f"row {seq}: {detail}")
        self.seq = seq
        self.detail = detail


class CheckpointError(AuditError):
    """A checkpoint was refused; the subclasses say why."""


class MalformedCheckpointError(CheckpointError):
    """Not a checkpoint: unparsable bytes or JSON line, a wrong origin, a hash that is not 32 bytes."""


class BadCheckpointSignatureError(CheckpointError):
    """The signature does not verify, or its key is unknown, retired, or not one of the audit service's."""


class UntrustedSigningKeyError(CheckpointError):
    """The audit service's own new checkpoint was refused: the key it signed with is not (or no longer) trusted,
    as for the moment between a retirement and the service's next look at the key ring. Transient."""


class CheckpointRollbackError(CheckpointError):
    """The checkpoint's length is below the last accepted one: somebody is replaying an older log state."""


class CheckpointForkError(CheckpointError):
    """Same length as the last accepted checkpoint but another head hash: two different logs were signed."""


class CheckpointsMissingError(CheckpointError):
    """The checkpoint file lacks checkpoints published on `audit.checkpoints.v1`: it was lost, cut short or
    replaced, and what it still holds is not all the log was signed at."""


class ChainBrokenError(AuditError):
    """Raised by `ChainReport.raise_if_broken` for a log that failed verification."""

    def __init__(self, first_bad_seq: int, reason: str) -> None:
        super().__init__(f"audit log broken at seq {first_bad_seq}: {reason}")
        self.first_bad_seq = first_bad_seq
        self.reason = reason


class InstallError(AuditError):
    """`install` refused: it would not leave the log append-only for the service role."""
