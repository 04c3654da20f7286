"""In-memory adapters of the notifications ports, for unit tests of the handlers (same behaviour, no database)."""

import copy
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

from services.notifications.domain import Draft, Notification, SealedEmail


@dataclass
class MemoryNotifications:
    rows: list[Notification] = field(default_factory=list)
    owners: dict[str, str] = field(default_factory=dict)
    # What the recipients table holds: only sealed bytes, as the database would.
    emails: dict[str, SealedEmail] = field(default_factory=dict)
    last_sequence: dict[str, int] = field(default_factory=dict)
    deferred: list[tuple[Draft, str]] = field(default_factory=list)

    def remember_owner(self, account_id: str, owner: str) -> None:
        self.owners.setdefault(account_id, owner)  # an account never changes hands

    def owners_of(self, account_ids: list[str]) -> dict[str, str]:
        return {a: self.owners[a] for a in account_ids if a in self.owners}

    def save_email(self, recipient: str, sealed: SealedEmail) -> None:
        self.emails[recipient] = sealed

    def email_of(self, recipient: str) -> SealedEmail | None:
        return self.emails.get(recipient)

    def defer(self, draft: Draft, event_id: str, created_at: datetime) -> str | None:
        if draft.account_id in self.owners:
            return self.owners[draft.account_id]
        self.deferred.append((draft, event_id))
        return None

    def take_deferred(self, account_id: str) -> list[tuple[Draft, str]]:
        taken = [item for item in self.deferred if item[0].account_id == account_id]
        self.deferred = [item for item in self.deferred if item[0].account_id != account_id]
        return taken

    def append(self, draft: Draft, notification_id: str, event_id: str, created_at: datetime) -> Notification:
        sequence = self.last_sequence.get(draft.recipient, 0) + 1
        self.last_sequence[draft.recipient] = sequence
        notification = Notification(notification_id, draft.recipient, sequence, draft.kind, draft.text, created_at,
                                    event_id)
        self.rows.append(notification)
        return notification

    def after(self, recipient: str, after_sequence: int, limit: int) -> list[Notification]:
        mine = [n for n in list(self.rows) if n.recipient == recipient and n.sequence > after_sequence]
        return sorted(mine, key=lambda n: n.sequence)[:limit]


@dataclass
class MemoryUnitOfWork:
    """Commits on success, rolls back on error, one at a time, as the database does."""

    notifications: MemoryNotifications = field(default_factory=MemoryNotifications)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @contextmanager
    def __call__(self) -> Iterator["MemoryUnitOfWork"]:
        with self._lock:
            before = {name: copy.copy(value) for name, value in vars(self.notifications).items()}
            try:
                yield self
            except BaseException:
                self.notifications.__dict__.update(before)
                raise
