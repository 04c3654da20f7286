"""Edge labs: a burst of calls over the per-principal rate limit, and hostile input (amounts no int64 holds,
a message over the size limit)."""

import collections
import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import jwt
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from bastion.accounts.v1 import accounts_pb2, accounts_pb2_grpc
from bastion.labs.bank import Bank, euros
from bastion.labs.base import Evidence
from bastion.labs.platform import TIMEOUT, Answer, LabSetupError, Session, answer, new_correlation_id
from bastion.runtime import DEFAULT_RATE_LIMIT

BURST_USER = "ada"  # the auditor: no other lab calls accounts as her, so her spent window disturbs nobody
BURST_THREADS = 16
# Two windows' worth of the services' limit, in case the burst straddles a window's end.
BURST_CAP = 2 * DEFAULT_RATE_LIMIT.calls + BURST_THREADS
WINDOW = re.compile(r"per (\d+)s")
# How the rate limiter words its refusal (bastion/grpc/ratelimit.py): RESOURCE_EXHAUSTED alone could be another
# limit (a message over the size cap).
LIMITER_REFUSAL = re.compile(r"rate limit of \d+ calls per \d+s exceeded")
SIZE_CAP_REFUSAL = "larger than max"  # gRPC's own words for a message over grpc.max_receive_message_length
MAX_MESSAGE_BYTES = 1 << 20


def _list_accounts(stub: accounts_pb2_grpc.AccountsStub, metadata: tuple[tuple[str, str], ...]) -> Answer:
    return answer(lambda: stub.ListAccounts(accounts_pb2.ListAccountsRequest(), metadata=metadata, timeout=TIMEOUT))


def rate_limit(session: Session) -> Iterator[Evidence]:
    accounts = accounts_pb2_grpc.AccountsStub(session.channel("accounts"))  # type: ignore[no-untyped-call]
    metadata = session.as_user(BURST_USER, new_correlation_id("rate-limit"))
    calibration = _list_accounts(accounts, metadata)
    if not calibration.ok:
        raise LabSetupError(f"{BURST_USER} could not list accounts ({calibration})")
    yield Evidence(f"{BURST_USER} lists accounts (calibration)", "OK")
    codes: collections.Counter[str] = collections.Counter()
    first_refusal: list[Answer] = []
    stop, lock = threading.Event(), threading.Lock()

    def hammer() -> None:
        while not stop.is_set():
            result = _list_accounts(accounts, metadata)
            with lock:
                codes[result.code.name] += 1
                if result.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not first_refusal:
                    first_refusal.append(result)
                if first_refusal or sum(codes.values()) >= BURST_CAP:
                    stop.set()

    started = time.monotonic()
    workers = [threading.Thread(target=hammer) for _ in range(BURST_THREADS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    took = time.monotonic() - started
    try:
        yield Evidence(f"{BURST_USER} calls accounts.ListAccounts from {BURST_THREADS} threads as fast as she can",
                       f"{codes['OK']} answered in {took:.1f}s, then "
                       + (str(first_refusal[0]) if first_refusal else f"no refusal in {sum(codes.values())} calls"),
                       bool(first_refusal) and bool(LIMITER_REFUSAL.search(first_refusal[0].details)))
        others = _list_accounts(accounts, session.as_user("alice", new_correlation_id("rate-limit")))
        yield Evidence("alice, meanwhile", "OK: the limit is per principal" if others.ok else str(others), others.ok)
    finally:
        stated = WINDOW.search(first_refusal[0].details) if first_refusal else None
        _reset_window(session, metadata, int(stated.group(1)) if stated else 60)
    after = _list_accounts(accounts, metadata)
    yield Evidence(f"{BURST_USER} once the lab has deleted her window's counter", str(after))


def _reset_window(session: Session, metadata: tuple[tuple[str, str], ...], window_seconds: int) -> None:
    """Delete the burst user's counters (RedisRateLimiter's keys in the accounts key space), so that the install
    is left as the lab found it rather than one principal locked out until the window ends."""
    token = dict(metadata)["authorization"].removeprefix("Bearer ")
    claims = jwt.decode(token, options={"verify_signature": False})
    ctx = session.ctx
    client = redis.Redis(**ctx.redis_options("accounts", ctx.credentials.redis["accounts"]), socket_timeout=3,
                         retry=Retry(NoBackoff(), 0))
    now = int(time.time()) // window_seconds
    try:
        client.delete(*(f"accounts:ratelimit:{claims['azp']}:{claims['sub']}:{window}"
                        for window in (now - 1, now, now + 1)))
    finally:
        client.close()


def _varint(value: int) -> bytes:
    """Protobuf's base-128 varint of an unsigned VALUE (up to 10 bytes)."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _raw_transfer(source: str, target: str, amount: bytes, key: str = "") -> bytes:
    """A payments.v1.TransferRequest written by hand, so that the amount can be any varint on the wire."""
    def text(number: int, value: str) -> bytes:
        data = value.encode()
        return _varint(number << 3 | 2) + _varint(len(data)) + data

    return (text(1, key or f"lab-hostile-input-{uuid.uuid4()}") + text(2, source) + text(3, target)
            + _varint(4 << 3) + amount + text(5, "EUR"))


def _send(transfer: Any, request: bytes, metadata: tuple[tuple[str, str], ...]) -> Answer:
    return answer(lambda: transfer(request, metadata=metadata, timeout=TIMEOUT))


def hostile_input(session: Session) -> Iterator[Evidence]:
    bank = Bank(session, "hostile-input")
    source, target = bank.open_account("alice", 1_000), bank.open_account("bob")
    transfer = session.channel("payments").unary_unary("/bastion.payments.v1.Payments/Transfer")
    metadata = bank.metadata("alice")
    amounts = {"zero": _varint(0), "-5 (as int64 travels)": _varint(2**64 - 5),
               "2**63 (beyond int64, read as its most negative value)": _varint(2**63),
               "2**64 - 1 (the largest varint, read as -1)": _varint(2**64 - 1)}
    for label, wire in amounts.items():
        result = _send(transfer, _raw_transfer(source, target, wire), metadata)
        yield Evidence(f"a transfer of {label} from alice's account", str(result),
                       result.code == grpc.StatusCode.INVALID_ARGUMENT and "amount" in result.details)
    oversized = _raw_transfer(source, target, _varint(100), key="x" * (2 * MAX_MESSAGE_BYTES))
    result = _send(transfer, oversized, metadata)
    if result.code == grpc.StatusCode.RESOURCE_EXHAUSTED and LIMITER_REFUSAL.search(result.details):
        raise LabSetupError(f"alice's rate-limit window is spent ({result}): the size cap was never reached, "
                            "the lab cannot tell; run it again in a minute")
    yield Evidence(f"a request of {len(oversized) // MAX_MESSAGE_BYTES} MiB (the limit is 1 MiB)", str(result),
                   result.code == grpc.StatusCode.RESOURCE_EXHAUSTED and SIZE_CAP_REFUSAL in result.details)
    balances = (bank.balance(source), bank.balance(target))
    yield Evidence("balances", f"alice {euros(balances[0])}, bob {euros(balances[1])}", balances == (1_000, 0))
