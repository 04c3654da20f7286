"""The repository contract of the notifications service, run against every implementation of the port: the
in-memory fake here, PostgreSQL in tests/integration/test_notifications_postgres.py."""

import datetime as dt
import uuid

import pytest

from services.notifications.domain import Draft, SealedEmail
from services.notifications.fakes import MemoryUnitOfWork
from services.notifications.handlers import UnitOfWorkFactory

NOW = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def append(unit_of_work: UnitOfWorkFactory, recipient: str, text: str = "hello") -> int:
    with unit_of_work() as uow:
        stored = uow.notifications.append(Draft(recipient, "test", text), str(uuid.uuid4()), str(uuid.uuid4()), NOW)
    return stored.sequence


class RepositoryContract:
    """Subclasses provide the `unit_of_work` fixture (a fresh, empty store) and `user`, a unique name."""

    def test_sequences_start_at_one_and_count_per_recipient(self, unit_of_work: UnitOfWorkFactory, user: str
                                                            ) -> None:
        other = f"{user}-other"
        assert [append(unit_of_work, user), append(unit_of_work, user), append(unit_of_work, other),
                append(unit_of_work, user)] == [1, 2, 1, 3]

    def test_after_is_ordered_limited_and_own_only(self, unit_of_work: UnitOfWorkFactory, user: str) -> None:
        for n in range(5):
            append(unit_of_work, user, f"n{n}")
        append(unit_of_work, f"{user}-other")
        with unit_of_work() as uow:
            page = uow.notifications.after(user, 1, 3)
            assert [(n.sequence, n.text, n.recipient) for n in page] == [(2, "n1", user), (3, "n2", user),
                                                                         (4, "n3", user)]
            assert page[0].created_at == NOW and page[0].kind == "test"
            assert uow.notifications.after(user, 5, 10) == []

    def test_a_rolled_back_append_leaves_no_gap(self, unit_of_work: UnitOfWorkFactory, user: str) -> None:
        append(unit_of_work, user)
        with pytest.raises(RuntimeError), unit_of_work() as uow:
            uow.notifications.append(Draft(user, "test", "lost"), str(uuid.uuid4()), str(uuid.uuid4()), NOW)
            raise RuntimeError("the consumer's transaction fails")
        assert append(unit_of_work, user) == 2

    def test_owners_are_remembered_once(self, unit_of_work: UnitOfWorkFactory, user: str) -> None:
        with unit_of_work() as uow:
            uow.notifications.remember_owner(f"{user}-a1", user)
            uow.notifications.remember_owner(f"{user}-a1", "mallory")
            assert uow.notifications.owners_of([f"{user}-a1", f"{user}-nope"]) == {f"{user}-a1": user}

    def test_a_sealed_email_is_kept_replaced_and_separate_from_sequences(self, unit_of_work: UnitOfWorkFactory,
                                                                        user: str) -> None:
        append(unit_of_work, user)
        with unit_of_work() as uow:
            assert uow.notifications.email_of(user) is None
            uow.notifications.save_email(user, SealedEmail("k1", b"\x01" * 40))
            uow.notifications.save_email(user, SealedEmail("k2", b"\x02" * 40))
            assert uow.notifications.email_of(user) == SealedEmail("k2", b"\x02" * 40)
            assert uow.notifications.email_of(f"{user}-nobody") is None
        assert append(unit_of_work, user) == 2

    def test_deferred_drafts_wait_for_their_account_and_are_taken_once(self, unit_of_work: UnitOfWorkFactory,
                                                                        user: str) -> None:
        account, other = f"{user}-acc-1", f"{user}-acc-2"
        with unit_of_work() as uow:
            assert uow.notifications.defer(Draft("", "k1", "first", account), "event-1", NOW) is None
            assert uow.notifications.defer(Draft("", "k2", "second", account), "event-2", NOW) is None
            assert uow.notifications.defer(Draft("", "k3", "elsewhere", other), "event-3", NOW) is None
        with unit_of_work() as uow:
            uow.notifications.remember_owner(account, user)
            assert uow.notifications.take_deferred(account) == [(Draft("", "k1", "first", account), "event-1"),
                                                                (Draft("", "k2", "second", account), "event-2")]
            assert uow.notifications.take_deferred(account) == []
            # Once the owner is known, nothing more waits: the owner comes back instead.
            assert uow.notifications.defer(Draft("", "k4", "late", account), "event-4", NOW) == user
        with unit_of_work() as uow:
            assert [event for _, event in uow.notifications.take_deferred(other)] == ["event-3"]


class TestMemoryNotifications(RepositoryContract):
    @pytest.fixture()
    def unit_of_work(self) -> UnitOfWorkFactory:
        return MemoryUnitOfWork()

    @pytest.fixture()
    def user(self) -> str:
        return "alice"
