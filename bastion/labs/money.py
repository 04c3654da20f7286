"""Money labs: a double-spend race, a lock holder that wakes up after losing its lock, and a retry storm
against a failing downstream."""

import asyncio
import collections
import concurrent.futures
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import redis
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from bastion.accounts.v1 import accounts_pb2, accounts_pb2_grpc
from bastion.devstack.components.keycloak import Keycloak
from bastion.grpc.channels import call_metadata, secure_channel
from bastion.grpc.client import Downstream, ServiceTokens, is_unhealthy
from bastion.grpc.errors import UnavailableError
from bastion.grpc.server import server_credentials
from bastion.labs.bank import Bank, euros
from bastion.labs.base import Evidence
from bastion.labs.platform import TIMEOUT, Answer, LabSetupError, Session, answer, new_correlation_id
from bastion.resilience.breaker import redis_breaker, redis_namespace
from bastion.resilience.locks import FencedLock
from bastion.resilience.retry import RetryBudget

RACE_BALANCE = 1_000
RACE_AMOUNT = 300
RACE_DISTINCT_KEYS = 12
RACE_SHARED_KEY_SENDS = 8
PAUSED_LOCK_TTL_SECONDS = 2.0
STORM_CALLS = 30
STORM_FAIL_MAX = 5
FAST_SECONDS = 0.1  # an open breaker answers at once: no connection, no retry, no backoff


def _race(bank: Bank, source: str, target: str, keys: list[str]) -> list[tuple[str, Answer]]:
    """Send a transfer for each of KEYS at the same moment, each from its own thread."""
    metadata = bank.metadata("alice")
    start = threading.Barrier(len(keys))

    def send(key: str) -> tuple[str, Answer]:
        request = bank.transfer_request(source, target, RACE_AMOUNT, key)
        start.wait()
        return key, answer(lambda: bank.payments.Transfer(request, metadata=metadata, timeout=30))

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(keys)) as pool:
        return list(pool.map(send, keys))


def _completed(answers: list[tuple[str, Answer]]) -> set[str]:
    return {str(result.reply.payment.payment_id) for _, result in answers
            if result.ok and result.reply.payment.status == "COMPLETED"}


def _summary(answers: list[tuple[str, Answer]]) -> str:
    completed = _completed(answers)
    refusals = collections.Counter(f"{result.code.name} ({result.details})" for _, result in answers if not result.ok)
    answered = sum(1 for _, result in answers if result.ok)
    return (f"{answered} answer(s) naming {len(completed)} completed payment(s); refused: "
            + (", ".join(f"{count} x {why}" for why, count in refusals.most_common()) or "none"))


def double_spend(session: Session) -> Iterator[Evidence]:
    bank = Bank(session, "double-spend")
    source, target = bank.open_account("alice", RACE_BALANCE), bank.open_account("bob")
    shared = _race(bank, source, target, [f"lab-double-spend-{uuid.uuid4()}"] * RACE_SHARED_KEY_SENDS)
    if not _completed(shared):
        # Nothing moved, so nothing moved twice: every check below would pass without a race having been run.
        raise LabSetupError(f"no transfer of the one-key race completed ({_summary(shared)}): the lab cannot tell")
    yield Evidence(f"{RACE_SHARED_KEY_SENDS} transfers of {euros(RACE_AMOUNT)} at once with one idempotency key",
                   _summary(shared), len(_completed(shared)) == 1)
    remaining = RACE_BALANCE - RACE_AMOUNT * len(_completed(shared))
    distinct = _race(bank, source, target, [f"lab-double-spend-{uuid.uuid4()}" for _ in range(RACE_DISTINCT_KEYS)])
    if remaining >= RACE_AMOUNT and not _completed(distinct):
        raise LabSetupError(f"no transfer of the race with distinct keys completed, with room for "
                            f"{remaining // RACE_AMOUNT} ({_summary(distinct)}): the lab cannot tell")
    yield Evidence(f"{RACE_DISTINCT_KEYS} transfers of {euros(RACE_AMOUNT)} at once, each with its own key, from "
                   f"the {euros(remaining)} left (room for {remaining // RACE_AMOUNT})", _summary(distinct),
                   len(_completed(distinct)) <= remaining // RACE_AMOUNT)
    completed = _completed(shared) | _completed(distinct)
    left, received = bank.balance(source), bank.balance(target)
    yield Evidence("alice's balance", euros(left), left >= 0)
    debited = RACE_BALANCE - left
    yield Evidence("one debit per completed payment", f"{euros(debited)} debited for {len(completed)} payment(s) of "
                   f"{euros(RACE_AMOUNT)}", debited == RACE_AMOUNT * len(completed))
    yield Evidence("money conserved", f"alice {euros(left)} + bob {euros(received)} = {euros(left + received)}",
                   left + received == RACE_BALANCE)


def paused_lock_holder(session: Session) -> Iterator[Evidence]:
    bank = Bank(session, "paused-lock-holder")
    source, target = bank.open_account("alice", 1_000), bank.open_account("bob")
    with capture_logs() as logs:
        stale_token, second, stale = asyncio.run(_race_a_paused_holder(session, bank, source, target))
    yield Evidence("the paused holder", f"took the payments lock on alice's account with fencing token {stale_token} "
                   f"(TTL {PAUSED_LOCK_TTL_SECONDS:.0f}s), then froze before its ApplyTransfer")
    if not second.ok:
        raise LabSetupError(f"the payments service's own transfer did not complete ({second})")
    yield Evidence(f"meanwhile, alice's transfer of {euros(200)} through the payments service",
                   f"{second.reply.payment.status}: it waited for the lock to expire, took it with a newer token")
    yield Evidence(f"the holder wakes up: accounts.ApplyTransfer of {euros(300)} with fencing token {stale_token}",
                   "OK: the stale write landed" if stale.ok else str(stale),
                   stale.code == grpc.StatusCode.FAILED_PRECONDITION and "fencing token" in stale.details)
    balances = (bank.balance(source), bank.balance(target))
    yield Evidence("balances", f"alice {euros(balances[0])}, bob {euros(balances[1])}", balances == (800, 200))
    for entry in logs:
        if entry.get("event") in ("lock_expired_before_release", "lock_lost"):
            yield Evidence("the holder's log", f"{entry['event']} resource={entry.get('resource')}")


async def _race_a_paused_holder(session: Session, bank: Bank, source: str, target: str) -> tuple[int, Answer, Answer]:
    ctx = session.ctx
    client = aioredis.Redis(**ctx.redis_options("payments", ctx.credentials.redis["payments"]))
    request = bank.transfer_request(source, target, 200)
    metadata = bank.metadata("alice")
    outcome: list[Answer] = []
    rival = threading.Thread(target=lambda: outcome.append(answer(
        lambda: bank.payments.Transfer(request, metadata=metadata, timeout=30))))
    try:
        # The same lock the payments service takes for a transfer out of this account (services/payments).
        async with FencedLock(client, "payments", f"account:{source}", ttl_seconds=PAUSED_LOCK_TTL_SECONDS) as token:
            rival.start()
            # The pause: a blocking wait freezes this event loop, so nothing extends the lock, exactly as a
            # stop-the-world pause or SIGSTOP would; the holder resumes believing it still holds the lock.
            rival.join(60)
            stale = _apply_as_payments(session, source, target, 300, token)
    finally:
        await client.aclose()
    if not outcome:
        raise LabSetupError("the payments service's transfer did not finish within 60s")
    return token, outcome[0], stale


def _apply_as_payments(session: Session, source: str, target: str, amount: int, fencing_token: int) -> Answer:
    stub = accounts_pb2_grpc.AccountsStub(session.channel("accounts", "payments"))  # type: ignore[no-untyped-call]
    request = accounts_pb2.ApplyTransferRequest(
        transfer_id=str(uuid.uuid4()), from_account_id=source, to_account_id=target, amount_minor=amount,
        currency="EUR", fencing_token=fencing_token, idempotency_key=f"lab-paused-lock-holder-{uuid.uuid4()}")
    metadata = call_metadata(session.service_token("payments"), new_correlation_id("paused-lock-holder"))
    return answer(lambda: stub.ApplyTransfer(request, metadata=metadata, timeout=TIMEOUT))


class _FailingService(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Any method, any request: UNAVAILABLE, counting the attempts that reached it."""

    def __init__(self) -> None:
        self.attempts = 0

    def service(self, details: Any) -> Any:
        return grpc.unary_unary_rpc_method_handler(self._fail)

    async def _fail(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        self.attempts += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "lab: this service is failing")


def retry_storm(session: Session) -> Iterator[Evidence]:
    downstream = f"lab-{uuid.uuid4().hex[:10]}"
    sync_redis = redis.Redis(**session.ctx.redis_options("payments", session.ctx.credentials.redis["payments"]))
    try:
        with capture_logs() as logs:
            attempts, calls, state = asyncio.run(_storm(session, downstream, sync_redis))
    finally:
        namespace = redis_namespace("payments", downstream)
        sync_redis.delete(*(f"{namespace}:pybreaker:{key}" for key in
                            ("state", "fail_counter", "success_counter", "opened_at")))
        sync_redis.close()
    yield Evidence("the downstream", f"a gRPC server over mTLS that answers UNAVAILABLE to everything; the caller is "
                   f"the payments identity through the client kit (retries, budget, breaker '{downstream}' in Redis)")
    if attempts == 0:
        # The breaker opening on calls that never reached the server says nothing of retries against a failing one.
        raise LabSetupError(f"no attempt reached the lab's failing server (last answer: {calls[-1][1]}): "
                            "the lab cannot tell")
    opened_at = next((number for number, (_, message) in enumerate(calls) if "circuit open" in message), None)
    yield Evidence(f"{STORM_CALLS} calls in a row", f"the failing service saw {attempts} attempt(s)",
                   attempts < STORM_CALLS)
    if opened_at is None:
        yield Evidence("the breaker", f"never opened; last answer: {calls[-1][1]}", False)
        return
    after = calls[opened_at:]
    slowest = max(seconds for seconds, _ in after)
    yield Evidence(f"calls {opened_at + 1} to {STORM_CALLS}, with the breaker open",
                   f"UNAVAILABLE at once (slowest {slowest * 1000:.1f} ms): {after[-1][1]}", slowest < FAST_SECONDS)
    yield Evidence("breaker state in Redis", state, state == "open")
    for entry in logs:
        if entry.get("event") == "circuit breaker state changed":
            yield Evidence("the caller's log",
                           f"circuit breaker state changed {entry.get('old')} -> {entry.get('new')}")


async def _storm(session: Session, downstream: str, sync_redis: redis.Redis
                 ) -> tuple[int, list[tuple[float, str]], str]:
    failing = _FailingService()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((failing,))
    port = server.add_secure_port(f"{session.ctx.settings.bind_host}:0", server_credentials(session.tls("accounts")))
    await server.start()
    settings = session.ctx.settings
    breaker = redis_breaker("payments", downstream, sync_redis, is_failure=is_unhealthy, fail_max=STORM_FAIL_MAX,
                            reset_timeout=60)
    keycloak = Keycloak(session.ctx)
    tokens = ServiceTokens.for_service(keycloak.server_url, keycloak.realm_name, "payments",
                                       session.ctx.credentials.keycloak_clients["payments"], str(session.ctx.ca_file))
    channel = secure_channel(f"{settings.public_host}:{port}", session.tls("payments"), "accounts")
    client = Downstream(downstream, channel, tokens, breaker, RetryBudget(), deadline_seconds=2.0)
    stub = accounts_pb2_grpc.AccountsStub(channel)  # type: ignore[no-untyped-call]
    calls: list[tuple[float, str]] = []
    try:
        for _ in range(STORM_CALLS):
            started = time.monotonic()
            try:
                await client.call(stub.GetAccount, accounts_pb2.GetAccountRequest(account_id="lab"))
                message = "OK"
            except UnavailableError as error:
                message = f"UNAVAILABLE: {error}"
            calls.append((time.monotonic() - started, message))
        state = await breaker.current_state()
    finally:
        await channel.close()
        await server.stop(0)
    return failing.attempts, calls, state
