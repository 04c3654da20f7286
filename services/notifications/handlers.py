"""The notifications use cases: turn verified events into notifications for the owners concerned, list a
caller's own notifications, and stream them (backlog first, then new ones, resumable without gaps)."""

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import structlog

from bastion.access.v1.decision_pb2 import SecurityAlert
from bastion.accounts.v1 import events_pb2 as accounts_events
from bastion.audit.alerts import ALERTING_SERVICE
from bastion.events.field_crypto import DataKeyRing, field_context, reveal
from bastion.events.verify import VerifiedEvent
from services.notifications import domain
from services.notifications.domain import Draft, Notification, SealedEmail, StreamExpiredError

log = structlog.get_logger(__name__)
ACCOUNTS_TOPIC = "accounts.events.v1"
OWNER_EMAIL = "bastion.accounts.v1.AccountOpened.owner_email"


@dataclass(frozen=True)
class Caller:
    """Who asks: an end user (username and realm roles)."""

    username: str
    roles: frozenset[str]


class NotificationsRepository(Protocol):
    def remember_owner(self, account_id: str, owner: str) -> None: ...
    def owners_of(self, account_ids: list[str]) -> dict[str, str]: ...
    def save_email(self, recipient: str, sealed: SealedEmail) -> None: ...
    def email_of(self, recipient: str) -> SealedEmail | None: ...
    def defer(self, draft: Draft, event_id: str, created_at: dt.datetime) -> str | None:
        """Keep DRAFT until the owner of its account is known; if the owner became known meanwhile (another
        consumer committed the AccountOpened), keep nothing and return the owner instead."""
        ...
    def take_deferred(self, account_id: str) -> list[tuple[Draft, str]]:
        """Remove and return the drafts waiting for ACCOUNT_ID's owner, with their events' ids, oldest first."""
        ...
    def append(self, draft: Draft, notification_id: str, event_id: str, created_at: dt.datetime) -> Notification:
        """Store DRAFT as the recipient's next notification: sequence = the previous one + 1, assigned so that
        concurrent appends for one recipient neither collide nor leave a gap."""
        ...
    def after(self, recipient: str, after_sequence: int, limit: int) -> list[Notification]: ...


class UnitOfWork(Protocol):
    @property
    def notifications(self) -> NotificationsRepository: ...


UnitOfWorkFactory = Callable[[], AbstractContextManager[UnitOfWork]]


class EmailCipher(Protocol):
    """Seals an address for its recipient's row (see adapters/at_rest.py)."""

    def encrypt(self, plaintext: str, recipient: str) -> SealedEmail: ...
    def decrypt(self, sealed: SealedEmail, recipient: str) -> str: ...


class NotificationsHandlers:
    def __init__(self, unit_of_work: UnitOfWorkFactory, data_keys: DataKeyRing | None, cipher: EmailCipher,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
                 new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
                 alert_recipients: tuple[str, ...] = ()) -> None:
        self.unit_of_work = unit_of_work
        self.alert_recipients = alert_recipients
        self.data_keys = data_keys
        self.cipher = cipher
        self.clock = clock
        self.new_id = new_id

    def on_event(self, uow: UnitOfWork, event: VerifiedEvent) -> list[Notification]:
        """Apply one verified event inside the consumer's transaction (UOW wraps the consumer's connection),
        so the notifications commit with the inbox row or not at all."""
        payload, repo = event.payload, uow.notifications
        now = self.clock()
        ready: list[tuple[Draft, str]] = []
        waited: list[tuple[Draft, str]] = []  # told after "your account is open", in the order they happened
        if isinstance(payload, accounts_events.AccountOpened) and payload.owner:
            repo.remember_owner(payload.account_id, payload.owner)
            self._keep_email(repo, event, payload)
            waited = [(draft.to(payload.owner), event_id) for draft, event_id in repo.take_deferred(payload.account_id)]
        if isinstance(payload, SecurityAlert):
            # Only the audit service may publish one (infra/event-trust.yaml, checked by the verifying consumer
            # before this runs); checked again here, as a trust file edited by mistake must not let others page.
            if event.envelope.producer == ALERTING_SERVICE:
                ready = [(draft, event.event_id) for draft in domain.alert_drafts(payload, self.alert_recipients)]
            else:
                log.warning("security_alert_ignored", producer=event.envelope.producer, event_id=event.event_id,
                            correlation_id=event.envelope.correlation_id)
        concerned = domain.accounts_concerned(payload)
        owners = repo.owners_of(concerned) if concerned else {}
        for draft in domain.drafts_for(payload, owners):
            if draft.recipient:
                ready.append((draft, event.event_id))
            elif (owner := repo.defer(draft, event.event_id, now)) is not None:
                ready.append((draft.to(owner), event.event_id))
            else:
                log.info("notification_deferred_until_owner_known", event_type=event.envelope.event_type,
                         event_id=event.event_id, account_id=draft.account_id,
                         correlation_id=event.envelope.correlation_id)
        # Appends lock each recipient's row: taken in name order, two opposite transfers applied by two
        # consumers at once cannot deadlock. The sort is stable, so one recipient's notifications keep their order.
        ready = sorted(ready + waited, key=lambda item: item[0].recipient)
        return [repo.append(draft, self.new_id(), event_id, now) for draft, event_id in ready]

    def _keep_email(self, repo: NotificationsRepository, event: VerifiedEvent,
                    payload: accounts_events.AccountOpened) -> None:
        if not payload.HasField("owner_email"):
            return
        context = field_context(OWNER_EMAIL, event.envelope.aggregate_id)
        # A tampered field raises (and the event is dead-lettered); a key this service lacks is logged.
        email = reveal(self.data_keys, ACCOUNTS_TOPIC, context, payload.owner_email)
        if email is None:
            log.warning("owner_email_not_readable", key_id=payload.owner_email.key_id, event_id=event.event_id)
            return
        repo.save_email(payload.owner, self.cipher.encrypt(email, payload.owner))

    def list_notifications(self, caller: Caller, after_sequence: int = 0, limit: int = 100) -> list[Notification]:
        """The caller's own notifications after AFTER_SEQUENCE, oldest first; nobody sees anyone else's."""
        domain.check_page(after_sequence, limit)
        with self.unit_of_work() as uow:
            return uow.notifications.after(caller.username, after_sequence, limit)

    def email_of(self, recipient: str) -> str | None:
        """RECIPIENT's address in clear, for the mailer only: never returned to a caller."""
        with self.unit_of_work() as uow:
            sealed = uow.notifications.email_of(recipient)
        return None if sealed is None else self.cipher.decrypt(sealed, recipient)


class NotificationStream:
    """StreamNotifications: the caller's notifications after AFTER_SEQUENCE, then new ones as they are stored.

    A client that reconnects passes the last sequence it saw and misses nothing: sequences are per recipient
    and gap-free, and a later one never commits before an earlier one (see the repository's `append`). New
    notifications are found by polling, since the consumer that stores them may run in another process."""

    def __init__(self, handlers: NotificationsHandlers, caller: Caller, after_sequence: int = 0,
                 poll_seconds: float = 0.5, page: int = 100, expires_at: dt.datetime | None = None) -> None:
        domain.check_page(after_sequence, page)
        self.handlers = handlers
        self.caller = caller
        self.last_sequence = after_sequence
        self.poll_seconds = poll_seconds
        self.page = page
        # The caller's access token was checked once, when the stream opened: it must not outlive the token.
        self.expires_at = expires_at

    async def __aiter__(self) -> AsyncIterator[Notification]:
        while True:
            if self.expires_at is not None and self.handlers.clock() >= self.expires_at:
                raise StreamExpiredError(
                    "the access token expired while streaming: reconnect with a fresh token and "
                    f"after_sequence={self.last_sequence} to continue without a gap")
            batch = await asyncio.to_thread(self.handlers.list_notifications, self.caller, self.last_sequence,
                                            self.page)
            for notification in batch:
                self.last_sequence = notification.sequence
                yield notification
            if len(batch) < self.page:
                await asyncio.sleep(self.poll_seconds)
