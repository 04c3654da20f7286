"""Access-control labs: a service acting as another, a customer reaching for another customer's account, and
principals reaching into data stores that are not theirs."""

import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import redis
from psycopg.conninfo import make_conninfo
from redis.backoff import NoBackoff
from redis.retry import Retry

from bastion.accounts.v1 import accounts_pb2, accounts_pb2_grpc
from bastion.devstack.components.postgres import Postgres
from bastion.grpc.channels import call_metadata
from bastion.labs.bank import Bank, euros
from bastion.labs.base import Evidence
from bastion.labs.platform import (
    TIMEOUT,
    Answer,
    LabSetupError,
    Session,
    Watch,
    answer,
    new_correlation_id,
)
from bastion.pages import MAX_PAGE_SIZE

LAB_IMPERSONATION = "impersonation"
# The words of the refusals the datastore lab is about (an error of the same kind for another reason cannot tell):
# pg_hba.conf's TLS-only rule, the database's CONNECT grant, SCRAM; Redis's default user off (its answer to an
# unauthenticated HELLO, as redis-py opens a RESP3 connection; NOAUTH and WRONGPASS in redis-py's wording).
POSTGRES_REFUSALS = ("no pg_hba.conf entry", "permission denied for database", "password authentication failed",
                     "no password supplied")
REDIS_AUTH_REFUSALS = ("must be called with the client already authenticated", "Authentication required",
                       "invalid username-password pair", "user is disabled", "NOAUTH", "WRONGPASS")
LAB_OTHER_CUSTOMER = "other-customer"


def _context(watch: Watch, service: str, event: str, correlation_id: str) -> Iterator[Evidence]:
    for line in watch.log_lines(service, event, correlation_id)[:1]:
        yield Evidence(f"{service}.log", line)
    for entry in watch.audit_entries(correlation_id)[:1]:
        yield Evidence("audit trail", str(entry))


def _expect(what: str, result: Answer, codes: set[grpc.StatusCode], accepted: str) -> Evidence:
    if result.ok:
        return Evidence(what, f"OK: {accepted}", False)
    return Evidence(what, str(result), result.code in codes)


def service_impersonation(session: Session) -> Iterator[Evidence]:
    bank = Bank(session, LAB_IMPERSONATION)
    source, target = bank.open_account("alice", 1_000), bank.open_account("bob")

    def apply_transfer(identity: str, token: str, correlation_id: str, accounts: tuple[str, str]) -> Answer:
        stub = accounts_pb2_grpc.AccountsStub(session.channel("accounts", identity))  # type: ignore[no-untyped-call]
        request = accounts_pb2.ApplyTransferRequest(
            transfer_id=str(uuid.uuid4()), from_account_id=accounts[0], to_account_id=accounts[1], amount_minor=500,
            currency="EUR", fencing_token=10**12, idempotency_key=f"lab-{LAB_IMPERSONATION}-{uuid.uuid4()}")
        metadata = call_metadata(token, correlation_id)
        return answer(lambda: stub.ApplyTransfer(request, metadata=metadata, timeout=TIMEOUT))

    nowhere = (str(uuid.uuid4()), str(uuid.uuid4()))
    calibration = apply_transfer("payments", session.service_token("payments"),
                                 new_correlation_id(LAB_IMPERSONATION), nowhere)
    if calibration.code != grpc.StatusCode.NOT_FOUND:
        raise LabSetupError(f"the payments identity itself was not admitted to ApplyTransfer ({calibration})")
    yield Evidence("payments' certificate + payments' token, ApplyTransfer between unknown accounts (calibration)",
                   f"{calibration}: admitted by the policy, refused only by the handler")
    watch = session.watch()
    denied, unauthenticated = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED
    attempts = {
        # Its own token names no audience (it calls nobody): refused before the policy is even asked.
        "notifications' certificate + notifications' own service token": (
            "notifications", session.service_token("notifications"), {denied, unauthenticated}),
        "notifications' certificate + a stolen payments service token": (
            "notifications", session.service_token("payments"), {denied}),
        "the bastion command's certificate + alice's token (a customer)": (
            "cli", session.user_token("alice"), {denied}),
    }
    correlation_id = ""
    for what, (identity, token, codes) in attempts.items():
        correlation_id = new_correlation_id(LAB_IMPERSONATION)
        yield _expect(f"{what}: accounts.ApplyTransfer of 5.00 EUR from alice to bob",
                      apply_transfer(identity, token, correlation_id, (source, target)), codes,
                      "the transfer was applied")
    balances = (bank.balance(source), bank.balance(target))
    yield Evidence("balances after the attempts", f"alice {euros(balances[0])}, bob {euros(balances[1])}",
                   balances == (1_000, 0))
    yield from _context(watch, "accounts", "call_refused", correlation_id)


def other_customer_account(session: Session) -> Iterator[Evidence]:
    bank = Bank(session, LAB_OTHER_CUSTOMER)
    alices, bobs = bank.open_account("alice", 1_000), bank.open_account("bob")
    own = answer(lambda: bank.accounts.GetAccount(accounts_pb2.GetAccountRequest(account_id=alices),
                                                  metadata=bank.metadata("alice"), timeout=TIMEOUT))
    if not own.ok:
        raise LabSetupError(f"alice could not read her own account ({own})")
    yield Evidence("alice reads her own account (calibration)", f"OK: balance {euros(own.reply.account.balance_minor)}")
    watch = session.watch()
    read_id = new_correlation_id(LAB_OTHER_CUSTOMER)
    read = answer(lambda: bank.accounts.GetAccount(accounts_pb2.GetAccountRequest(account_id=alices),
                                                   metadata=bank.metadata("bob", read_id), timeout=TIMEOUT))
    seen = f"bob read it: owner {read.reply.account.owner}, balance {euros(read.reply.account.balance_minor)}" \
        if read.ok else ""
    yield _expect("bob: accounts.GetAccount on alice's account", read, {grpc.StatusCode.NOT_FOUND}, seen)
    shown = _every_account(bank, "bob")
    yield Evidence("bob: accounts.ListAccounts", f"{len(shown)} account(s), "
                   + ("alice's among them" if alices in shown else "his own only"), alices not in shown)
    pay = answer(lambda: bank.payments.Transfer(bank.transfer_request(alices, bobs, 500),
                                                metadata=bank.metadata("bob"), timeout=TIMEOUT))
    yield _expect("bob: payments.Transfer of 5.00 EUR from alice's account to his", pay, {grpc.StatusCode.NOT_FOUND},
                  "the money moved")
    left = bank.balance(alices)
    yield Evidence("alice's balance afterwards", euros(left), left == 1_000)
    yield from _context(watch, "accounts", "call_failed", read_id)


def _refused(what: str, attempt: Callable[[], Any], refusals: tuple[type[Exception], ...],
             saying: tuple[str, ...] = ()) -> Evidence:
    """Held when ATTEMPT raises one of REFUSALS and, if SAYING is given, its message holds one of those words: an
    error of the same kind for another reason (a server out of connection slots, a timeout) cannot tell."""
    try:
        attempt()
    except refusals as error:
        message = (str(error).strip().splitlines() or [""])[0][:240]
        if saying and not any(words in str(error) for words in saying):
            raise LabSetupError(f"{what}: failed for another reason than a refusal ({type(error).__name__}: "
                                f"{message}): the lab cannot tell") from None
        return Evidence(what, f"refused: {type(error).__name__}: {message}", True)
    return Evidence(what, "accepted", False)


def datastore_access(session: Session) -> Iterator[Evidence]:
    ctx = session.ctx
    postgres = Postgres(ctx)

    def redis_as(user: str | None, password: str | None, tls: bool = True) -> redis.Redis:
        # No retries: a refusal is the answer we are after, not a hiccup to retry through.
        options = {**ctx.redis_options(user or "", password or ""), "username": user, "password": password}
        if not tls:
            options = {key: options[key] for key in ("host", "port", "username", "password")}
        return redis.Redis(**options, socket_timeout=3, retry=Retry(NoBackoff(), 0))

    def connect(conninfo: str) -> None:
        with psycopg.connect(conninfo) as conn:
            conn.execute("SELECT 1")

    payments_redis = redis_as("payments", ctx.credentials.redis["payments"])
    accounts_db = postgres.conninfo("accounts", ctx.credentials.postgres["accounts"], dbname="accounts")
    try:
        payments_redis.ping()
        connect(accounts_db)
    except (redis.RedisError, psycopg.Error) as error:
        raise LabSetupError(f"a service could not reach its own data store: {type(error).__name__}") from error
    yield Evidence("payments in its Redis key space, accounts in its own database (calibration)", "OK")
    try:
        yield _refused("Redis without credentials (the default user)", lambda: redis_as(None, None).ping(),
                       (redis.AuthenticationError, redis.ResponseError), REDIS_AUTH_REFUSALS)
        yield _refused("Redis as payments, reading a key of accounts", lambda: payments_redis.get("accounts:lab"),
                       (redis.exceptions.NoPermissionError,))
        yield _refused("Redis as payments, FLUSHALL", payments_redis.flushall, (redis.exceptions.NoPermissionError,))
        yield _refused("Redis as payments with its password, without TLS",
                       lambda: redis_as("payments", ctx.credentials.redis["payments"], tls=False).ping(),
                       (redis.ConnectionError,))
    finally:
        payments_redis.close()
    yield _refused("PostgreSQL as accounts, into the payments database",
                   lambda: connect(postgres.conninfo("accounts", ctx.credentials.postgres["accounts"],
                                                     dbname="payments")), (psycopg.OperationalError,),
                   POSTGRES_REFUSALS)
    yield _refused("PostgreSQL without TLS (sslmode=disable)",
                   lambda: connect(accounts_db.replace("sslmode=verify-full", "sslmode=disable")),
                   (psycopg.OperationalError,), POSTGRES_REFUSALS)
    with tempfile.TemporaryDirectory(prefix="bastion-lab-") as empty:  # no password file to fall back on
        without_password = make_conninfo(postgres.conninfo("accounts", "", dbname="accounts"), password=None,
                                         passfile=str(Path(empty) / "pgpass"))
        yield _refused("PostgreSQL without a password", lambda: connect(without_password),
                       (psycopg.OperationalError,), POSTGRES_REFUSALS)


def _every_account(bank: Bank, username: str) -> set[str]:
    """The ids of every account USERNAME is shown, page after page: one of alice's on any page would count."""

    def page(token: str) -> Any:
        request = accounts_pb2.ListAccountsRequest(page_size=MAX_PAGE_SIZE, page_token=token)
        return answer(lambda: bank.accounts.ListAccounts(request, metadata=bank.metadata(username), timeout=TIMEOUT))

    shown: set[str] = set()
    token = ""
    while True:
        listed = page(token)
        if not listed.ok:
            raise LabSetupError(f"{username} could not list his own accounts ({listed})")
        shown |= {account.account_id for account in listed.reply.accounts}
        token = listed.reply.next_page_token
        if not token:
            return shown
