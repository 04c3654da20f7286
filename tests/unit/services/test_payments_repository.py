"""The payments repository's contract, run against the in-memory fake here; an integration test subclasses
`PaymentsRepositoryContract` with a `repository` fixture on PostgreSQL, so a fake that passes means something."""

import datetime as dt
from collections.abc import Iterator

import pytest

from services.payments import domain
from services.payments.domain import IdempotencyConflictError, Payment, PaymentStatus, Transfer
from services.payments.fakes import MemoryPayments
from services.payments.handlers import PaymentsRepository, payment_place

NOON = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)


def payment(key: str, amount: int = 100, source: str = "acc-1", at: dt.datetime = NOON, by: str = "alice"
            ) -> Payment:
    transfer = Transfer(source, "acc-9", amount, "EUR", key)
    return domain.start(transfer, by, domain.fingerprint(transfer, by), at)


class PaymentsRepositoryContract:
    def test_a_payment_is_found_by_its_key_with_its_latest_status(self, repository: PaymentsRepository) -> None:
        first = payment("key-contract-1")
        repository.add(first)
        assert repository.by_idempotency_key("key-contract-1") == first
        repository.settle(domain.fail(first, "insufficient funds"))
        found = repository.by_idempotency_key("key-contract-1")
        assert found is not None and (found.status, found.reason) == (PaymentStatus.FAILED, "insufficient funds")
        assert repository.by_idempotency_key("key-contract-2") is None

    def test_an_outcome_is_recorded_once(self, repository: PaymentsRepository) -> None:
        repository.add(first := payment("key-contract-9"))
        assert repository.settle(domain.complete(first)) is True
        assert repository.settle(domain.fail(first, "too late")) is False
        found = repository.by_id(first.payment_id)
        assert found is not None and found.status is PaymentStatus.COMPLETED

    def test_a_second_payment_with_the_same_key_conflicts(self, repository: PaymentsRepository) -> None:
        repository.add(payment("key-contract-1"))
        with pytest.raises(IdempotencyConflictError):
            repository.add(payment("key-contract-1", amount=200))

    def test_sent_counts_pending_and_completed_of_the_source_on_its_utc_day(self, repository: PaymentsRepository
                                                                             ) -> None:
        repository.add(payment("key-pending-1", 100))
        repository.add(completed := payment("key-complete", 20))
        repository.settle(domain.complete(completed))
        repository.add(failed := payment("key-failed-01", 3))
        repository.settle(domain.fail(failed, "frozen"))
        repository.add(payment("key-other-src", 4000, source="acc-2"))
        repository.add(payment("key-yesterday", 5000, at=NOON - dt.timedelta(days=1)))
        assert repository.sent_on("acc-1", NOON.date()) == 120
        assert repository.sent_on("acc-3", NOON.date()) == 0

    def test_recent_transfers_of_any_status_are_counted(self, repository: PaymentsRepository) -> None:
        repository.add(payment("key-early-01", at=NOON - dt.timedelta(seconds=61)))
        repository.add(payment("key-recent-1", at=NOON - dt.timedelta(seconds=59)))
        repository.add(failed := payment("key-recent-2", at=NOON))
        repository.settle(domain.fail(failed, "frozen"))
        assert repository.count_since("acc-1", NOON - dt.timedelta(seconds=60)) == 2

    def test_pending_payments_before_a_cutoff_come_oldest_first(self, repository: PaymentsRepository) -> None:
        repository.add(late := payment("key-pending-late", at=NOON))
        repository.add(early := payment("key-pending-early", at=NOON - dt.timedelta(minutes=5)))
        repository.add(done := payment("key-done-early", at=NOON - dt.timedelta(minutes=9)))
        repository.settle(domain.complete(done))
        assert repository.pending_before(NOON + dt.timedelta(seconds=1), 10) == [early, late]
        assert repository.pending_before(NOON, 10) == [early]
        assert repository.pending_before(NOON + dt.timedelta(seconds=1), 1) == [early]

    def test_pending_payments_after_a_place_go_on_from_it_by_creation_then_id(
            self, repository: PaymentsRepository) -> None:
        at = NOON - dt.timedelta(minutes=5)
        first, second = sorted((payment("key-tie-0001", at=at), payment("key-tie-0002", at=at)), key=payment_place)
        repository.add(second)
        repository.add(first)
        repository.add(later := payment("key-tie-later", at=NOON))
        cutoff = NOON + dt.timedelta(seconds=1)
        assert repository.pending_before(cutoff, 10) == [first, second, later]
        assert repository.pending_before(cutoff, 10, payment_place(first)) == [second, later]
        assert repository.pending_before(cutoff, 1, payment_place(second)) == [later]
        assert repository.pending_before(cutoff, 10, payment_place(later)) == []


    def test_the_utc_day_runs_from_midnight_to_just_before_the_next(self, repository: PaymentsRepository) -> None:
        midnight = dt.datetime.combine(NOON.date(), dt.time(), dt.UTC)
        repository.add(payment("key-midnight", 1, at=midnight))
        repository.add(payment("key-last-us", 20, at=midnight + dt.timedelta(days=1, microseconds=-1)))
        repository.add(payment("key-next-day", 300, at=midnight + dt.timedelta(days=1)))
        assert repository.sent_on("acc-1", NOON.date()) == 21

    def test_a_transfer_made_exactly_at_the_start_of_the_window_counts(self, repository: PaymentsRepository) -> None:
        repository.add(payment("key-at-since", at=NOON - dt.timedelta(seconds=60)))
        repository.add(payment("key-other-source", source="acc-2", at=NOON))
        assert repository.count_since("acc-1", NOON - dt.timedelta(seconds=60)) == 1

    def test_a_users_payments_are_theirs_only_newest_first(self, repository: PaymentsRepository) -> None:
        repository.add(late := payment("key-alice-late", at=NOON))
        repository.add(payment("key-bob", at=NOON - dt.timedelta(minutes=9), by="bob"))
        repository.add(early := payment("key-alice-early", at=NOON - dt.timedelta(minutes=5)))
        repository.settle(domain.complete(early))
        assert repository.initiated_by("alice", 10) == [late, domain.complete(early)]
        assert repository.initiated_by("alice", 1) == [late]
        assert repository.initiated_by("mallory", 10) == []

    def test_a_users_payments_continue_before_a_place_in_creation_then_id_order(
            self, repository: PaymentsRepository) -> None:
        for key in ("key-a", "key-b", "key-c"):  # created at the same instant: the id orders them
            repository.add(payment(key, at=NOON))
        repository.add(payment("key-earlier", at=NOON - dt.timedelta(microseconds=1)))
        listed = repository.initiated_by("alice", 10)
        assert [p.created_at for p in listed] == [NOON] * 3 + [NOON - dt.timedelta(microseconds=1)]
        assert sorted((p.payment_id for p in listed[:3]), reverse=True) == [p.payment_id for p in listed[:3]]
        assert repository.initiated_by("alice", 10, payment_place(listed[1])) == listed[2:]
        assert repository.initiated_by("alice", 10, payment_place(listed[3])) == []


class TestMemoryPayments(PaymentsRepositoryContract):
    @pytest.fixture()
    def repository(self) -> Iterator[PaymentsRepository]:
        yield MemoryPayments()
