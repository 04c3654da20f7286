"""The audit use cases: list the log's records for an auditor, verify the whole chain against the signed
checkpoints, and raise security alerts over the refusals appended. A checkpoint that does not verify is itself a
security event: it is reported, never skipped."""

import datetime as dt
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import structlog
from prometheus_client import Counter
from sqlalchemy import Connection

from bastion.audit.alerts import Alert
from bastion.audit.chain import Appended, LogEntry
from bastion.audit.checkpoints import Checkpoint, CheckpointFile
from bastion.audit.errors import CheckpointError
from bastion.audit.published import WitnessUnavailableError, load_witnessed, unverified_reason
from bastion.audit.verify import ChainReport
from services.audit import domain
from services.audit.domain import EventQuery

log = structlog.get_logger(__name__)
SECURITY_ALERTS = Counter("bastion_security_alerts_total", "Security alerts raised by the audit service",
                          ["rule", "severity"])


class AuditReader(Protocol):
    def find(self, query: EventQuery) -> list[LogEntry]:
        """Entries matching QUERY with seq > query.after_seq, in seq order, at most query.page_size."""
        ...

    def check_chain(self, checkpoints: list[Checkpoint]) -> ChainReport: ...


class SecurityRecords(Protocol):
    """Raises a security record (an EventRejected on access.decisions.v1, kept by this service's own log)."""

    def checkpoint_refused(self, error: CheckpointError, where: str) -> None: ...


class Alerting(Protocol):
    """The alert detector, run in the transaction that appends each batch (see adapters/postgres.py)."""

    def start(self, conn: Connection, head: int, now: dt.datetime) -> list[Alert]: ...

    def observe(self, conn: Connection, placed: Sequence[Appended]) -> list[Alert]: ...


def announce(alerts: Sequence[Alert]) -> None:
    """Log and count alerts once their transaction committed."""
    for alert in alerts:
        SECURITY_ALERTS.labels(alert.rule.name, alert.rule.severity).inc()
        log.warning("security_alert", rule=alert.rule.name, severity=alert.rule.severity,
                    counted_by=alert.rule.count_by, key=alert.key, count=alert.count,
                    window_seconds=int(alert.rule.window.total_seconds()), first_seq=alert.first_seq,
                    last_seq=alert.last_seq, alert_id=alert.alert_id, correlation_id=alert.last_correlation_id)


ReaderFactory = Callable[[], AbstractContextManager[AuditReader]]


@dataclass(frozen=True)
class Verdict:
    report: ChainReport
    checkpoint_length: int
    published: int = 0  # checkpoints on audit.checkpoints.v1, every one of them a line of the file


class AuditHandlers:
    def __init__(self, reader: ReaderFactory, checkpoints: CheckpointFile, security: SecurityRecords,
                 witness: Callable[[], list[Checkpoint]]) -> None:
        """WITNESS reads the checkpoints published on audit.checkpoints.v1, which the file must all hold."""
        self.reader = reader
        self.checkpoints = checkpoints
        self.security = security
        self.witness = witness
        # The refusal recorded last, while the file keeps being refused the same way: every VerifyChain in the
        # meantime would add the same record again (an auditor's or a monitor's poll flooding the log).
        self._refusing: str | None = None
        self._refusing_lock = threading.Lock()  # VerifyChain runs on worker threads, several at once

    def list_events(self, query: EventQuery) -> tuple[list[LogEntry], str]:
        """A page of the log, and the token of the next page ("" when this one is the last)."""
        with self.reader() as reader:
            entries = reader.find(query)
        more = len(entries) == query.page_size
        return entries, domain.page_token(entries[-1].seq) if more else ""

    def verify_chain(self) -> Verdict:
        """Recompute the chain and check it against every accepted checkpoint, once the file is found to hold every
        checkpoint published on Kafka (a file lost, cut short or replaced must not read as fewer checkpoints to
        check against). A file that does not verify (bad signature, a length going backwards, a fork, published
        checkpoints missing) fails the verdict and raises a security record; so does nothing when the published
        checkpoints cannot be read, but the verdict fails all the same."""
        try:
            witnessed = load_witnessed(self.checkpoints, self.witness)
        except WitnessUnavailableError as error:
            log.error("checkpoint_witness_unavailable", detail=str(error))
            try:  # a file that does not verify on its own is still recorded while Kafka cannot be read
                self.checkpoints.load()
            except CheckpointError as refused:
                self._refused(refused)
            else:
                self._accepted()
            return Verdict(ChainReport(False, 0, b"", None, unverified_reason(error), 0), 0)
        except CheckpointError as error:
            self._refused(error)
            return Verdict(ChainReport(False, 0, b"", None, unverified_reason(error), 0), 0)
        self._accepted()
        checkpoints = witnessed.checkpoints
        with self.reader() as reader:
            report = reader.check_chain(checkpoints)
        return Verdict(report, checkpoints[-1].length if checkpoints else 0, witnessed.published)

    def _refused(self, error: CheckpointError) -> None:
        """Log every refusal; record it unless it is the one recorded last and the file was not accepted since (the
        same refusal again, not a new one). A refusal of another kind, or the same one after the file was
        accepted in between (a second tampering), is recorded again."""
        log.error("checkpoint_refused", error=type(error).__name__, detail=str(error))
        refusal = f"{type(error).__name__}: {error}"
        with self._refusing_lock:
            if refusal == self._refusing:
                return
            self.security.checkpoint_refused(error, str(self.checkpoints.path))
            self._refusing = refusal  # once recorded: a record that failed is tried again at the next refusal

    def _accepted(self) -> None:
        """The file verified: a refusal after this one is a new occurrence, recorded even if it reads the same."""
        with self._refusing_lock:
            self._refusing = None
