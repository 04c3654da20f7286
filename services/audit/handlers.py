"""The audit use cases: list the log's records for an auditor, and verify the whole chain against the signed
checkpoints. A checkpoint that does not verify is itself a security event: it is reported, never skipped."""

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import structlog

from bastion.audit.chain import LogEntry
from bastion.audit.checkpoints import Checkpoint, CheckpointFile
from bastion.audit.errors import CheckpointError
from bastion.audit.verify import ChainReport
from services.audit import domain
from services.audit.domain import EventQuery

log = structlog.get_logger(__name__)


class AuditReader(Protocol):
    def find(self, query: EventQuery) -> list[LogEntry]:
        """Entries matching QUERY with seq > query.after_seq, in seq order, at most query.page_size."""
        ...

    def check_chain(self, checkpoints: list[Checkpoint]) -> ChainReport: ...


class SecurityRecords(Protocol):
    """Raises a security record (an EventRejected on access.decisions.v1, kept by this service's own log)."""

    def checkpoint_refused(self, error: CheckpointError, where: str) -> None: ...


ReaderFactory = Callable[[], AbstractContextManager[AuditReader]]


@dataclass(frozen=True)
class Verdict:
    report: ChainReport
    checkpoint_length: int


class AuditHandlers:
    def __init__(self, reader: ReaderFactory, checkpoints: CheckpointFile, security: SecurityRecords) -> None:
        self.reader = reader
        self.checkpoints = checkpoints
        self.security = security

    def list_events(self, query: EventQuery) -> tuple[list[LogEntry], str]:
        """A page of the log, and the token of the next page ("" when this one is the last)."""
        with self.reader() as reader:
            entries = reader.find(query)
        more = len(entries) == query.page_size
        return entries, domain.page_token(entries[-1].seq) if more else ""

    def verify_chain(self) -> Verdict:
        """Recompute the chain and check it against every accepted checkpoint. A checkpoint file that does not
        verify (bad signature, a length going backwards, a fork) fails the verdict and raises a security record."""
        try:
            checkpoints = self.checkpoints.load()
        except CheckpointError as error:
            self.security.checkpoint_refused(error, str(self.checkpoints.path))
            log.error("checkpoint_refused", error=type(error).__name__, detail=str(error))
            return Verdict(ChainReport(False, 0, b"", None, f"checkpoint refused: {error}", 0), 0)
        with self.reader() as reader:
            report = reader.check_chain(checkpoints)
        return Verdict(report, checkpoints[-1].length if checkpoints else 0)
