"""In-memory adapters of the accounts ports, for unit tests of the handlers (same behaviour, no database)."""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from google.protobuf.message import Message

from bastion.events.v1.envelope_pb2 import EncryptedField
from services.accounts.domain import Account, IdempotencyConflictError


@dataclass
class MemoryAccounts:
    rows: dict[str, Account] = field(default_factory=dict)
    keys: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    lock_orders: list[list[str]] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)  # "lock" and "remembered", in the order the handler took them

    def add(self, account: Account) -> None:
        self.rows[account.account_id] = account

    def get(self, account_id: str) -> Account | None:
        return self.rows.get(account_id)

    def lock_in_order(self, account_ids: list[str]) -> dict[str, Account]:
        self.lock_orders.append(list(account_ids))
        self.steps.append("lock")
        return {i: self.rows[i] for i in account_ids if i in self.rows}

    def save(self, account: Account) -> None:
        self.rows[account.account_id] = account

    def listed(self, owner: str | None, after: str | None, limit: int) -> list[Account]:
        return sorted((a for a in self.rows.values() if (owner is None or a.owner == owner)
                       and (after is None or a.account_id > after)), key=lambda a: a.account_id)[:limit]

    def remembered(self, idempotency_key: str) -> tuple[str, bytes] | None:
        self.steps.append("remembered")
        return self.keys.get(idempotency_key)

    def remember(self, idempotency_key: str, fingerprint: str, response: bytes) -> None:
        if idempotency_key in self.keys:  # as PostgreSQL's primary key would refuse it
            raise IdempotencyConflictError("this idempotency key was used for a different request")
        self.keys[idempotency_key] = (fingerprint, response)


@dataclass
class MemoryEvents:
    emitted: list[tuple[Message, str]] = field(default_factory=list)

    def emit(self, payload: Message, aggregate_id: str) -> None:
        self.emitted.append((payload, aggregate_id))


@dataclass
class MemoryUnitOfWork:
    """Commits on success, rolls back (restores the rows and events) on error, as the database does."""

    accounts: MemoryAccounts = field(default_factory=MemoryAccounts)
    events: MemoryEvents = field(default_factory=MemoryEvents)

    @contextmanager
    def __call__(self) -> Iterator["MemoryUnitOfWork"]:
        rows, keys, emitted = dict(self.accounts.rows), dict(self.accounts.keys), list(self.events.emitted)
        try:
            yield self
        except BaseException:
            self.accounts.rows, self.accounts.keys, self.events.emitted = rows, keys, emitted
            raise


@dataclass
class MemoryPersonalData:
    """Seals a field as an opaque token and keeps the plaintext here, so a test can tell what was sealed without
    the field ever holding it."""

    sealed: dict[bytes, tuple[str, str, str]] = field(default_factory=dict)

    def seal(self, field_name: str, aggregate_id: str, plaintext: str) -> EncryptedField:
        token = f"sealed-{len(self.sealed) + 1}".encode()
        self.sealed[token] = (field_name, aggregate_id, plaintext)
        return EncryptedField(key_id="memory/1", nonce=b"\0" * 12, ciphertext=token)

    def reveal(self, sealed: EncryptedField) -> tuple[str, str, str]:
        return self.sealed[sealed.ciphertext]
