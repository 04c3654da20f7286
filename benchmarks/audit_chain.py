"""Benchmark of the audit store: append throughput, and full-chain verification and rebuild speed.

Run with `.venv/bin/python -m benchmarks.audit_chain [--records N]` (uses the dev install in .state and
starts it if it is not running; it is left running), or against any PostgreSQL with
`--url postgresql+psycopg://ADMIN@HOST:PORT/DB` (a superuser or the database owner; the run itself goes
through `--service-url`, or else the same URL with `SET ROLE audit`, so appends have the service role's
rights only). Prints, for a log of N records (default 100000):
1. append throughput: batched appends (`--batch` records per transaction, as the consumer commits a polled
   batch), log rows and live projections in the same transaction, plus a short run of one record per
   transaction for the per-transaction cost;
2. full-chain verification speed: `AuditLog.check_chain` streaming the whole log (server-side cursor,
   `--page` rows at a time) against the checkpoints signed while appending, and the process's peak RSS
   before and after it (a verifier that loaded the log would show it there);
3. projection rebuild speed: truncate and replay the whole log, with the live/rebuilt comparison;
4. the audit service's consumer on access decisions (`--decisions`, default 20000): signed bundles of
   `--bundle` decisions (default 100) sealed as the interceptors' audit seals them, each bundle taken through
   the consumer's checks and turned into records (`AuditRecords.of`, the service's own code; Kafka itself is
   left out), a polled batch of `--batch` records appended in one transaction; with the CPU per decision of
   this process and of the PostgreSQL session serving it.

The run installs into its own schema `bench_audit_<uuid>`, dropped at the end. Records are realistic: signed
envelopes (deposits, access decisions), 80 % domain events, 10 % access decisions, 10 % rejections; they
are built before each timed transaction, so building and signing them is not part of the figures.
"""

import argparse
import datetime as dt
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psutil
from confluent_kafka import TIMESTAMP_LOG_APPEND_TIME
from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.pool import ConnectionPoolEntry

from bastion.access.v1.decision_pb2 import AccessDecision, Decision
from bastion.accounts.v1.events_pb2 import MoneyDeposited
from bastion.audit.chain import EMPTY
from bastion.audit.checkpoints import Checkpointer, CheckpointFile
from bastion.audit.postgres import AUDIT_SCHEMA, AuditLog, install, rebuild
from bastion.audit.records import AuditRecord, RecordKind
from bastion.audit.records import Decision as AuditDecision
from bastion.devstack.catalog import load_services
from bastion.devstack.event_access import load_policy
from bastion.events.consumer import DeadLetters
from bastion.events.envelopes import seal
from bastion.events.keys import KeyRing, SigningKey
from bastion.events.trust import load_trust_policy
from bastion.events.verify import EnvelopeVerifier
from bastion.grpc.audit import BUNDLE_HEADERS, TOPIC, DecisionSealer
from bastion.grpc.audit import decision as access_decision
from bastion.settings import PROJECT_ROOT
from services.audit.adapters.kafka import AuditRecords

SERVICE_ROLE = "audit"
ORIGIN = "bastion.bench/audit"
ACCOUNTS = 500
PRINCIPALS = 50
SINGLE_APPENDS = 2_000


def bastion(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "bastion.cli", *args], check=True, capture_output=True)


def devstack_urls() -> tuple[URL, URL]:
    """The dev stack's admin and audit-service URLs for the `audit` database (starts the stack if needed)."""
    from bastion.devstack.components.postgres import ADMIN_ROLE, Postgres
    from bastion.devstack.stack import Stack
    from bastion.settings import DevstackSettings

    bastion("up")
    ctx = Stack(DevstackSettings(), progress=lambda message: None).context()
    postgres = Postgres(ctx)
    return (postgres.sqlalchemy_url(ADMIN_ROLE, ctx.credentials.postgres[ADMIN_ROLE], "audit"),
            postgres.sqlalchemy_url(SERVICE_ROLE, ctx.credentials.postgres[SERVICE_ROLE], "audit"))


def as_service_role(engine: Engine) -> Engine:
    """ENGINE with every connection switched to the service role (for a single admin URL)."""

    @event.listens_for(engine, "connect")
    def set_role(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f'SET ROLE "{SERVICE_ROLE}"')
        cursor.close()
        dbapi_connection.commit()

    return engine


class Records:
    """Audit records as the service would build them from consumed Kafka records, numbered from 1."""

    def __init__(self, key: SigningKey, decision_key: SigningKey) -> None:
        self.key = key
        self.decision_key = decision_key
        self.accounts = [str(uuid.uuid4()) for _ in range(ACCOUNTS)]
        self.next_number = 1

    def take(self, count: int) -> list[AuditRecord]:
        batch = [self.record(number) for number in range(self.next_number, self.next_number + count)]
        self.next_number += count
        return batch

    def record(self, number: int) -> AuditRecord:
        now = dt.datetime.now(dt.UTC)
        correlation_id = str(uuid.uuid4())
        account = self.accounts[number % ACCOUNTS]
        if number % 10 == 3:
            principal = f"user-{number % PRINCIPALS}"
            allowed = number % 40 != 3
            decision = AccessDecision(principal=principal, service_identity="spiffe://bastion.local/service/cli",
                                      method="/bastion.accounts.v1.Accounts/GetAccount",
                                      decision=Decision.DECISION_ALLOW if allowed else Decision.DECISION_DENY,
                                      reason="policy" if allowed else "not_owner", correlation_id=correlation_id)
            envelope = seal(self.decision_key, "access.decisions.v1", decision, "accounts-decisions", number,
                            correlation_id)
            return AuditRecord(
                kind=RecordKind.ACCESS, topic="access.decisions.v1", partition=number % 3, offset=number,
                event_id=envelope.event_id, event_type=envelope.event_type, producer=envelope.producer,
                aggregate_id=envelope.aggregate_id, correlation_id=correlation_id, occurred_at=now,
                recorded_at=now, envelope=envelope.SerializeToString(), principal=principal,
                action=decision.method, decision=AuditDecision.ALLOW if allowed else AuditDecision.DENY,
                reason=decision.reason, detail=decision.service_identity)
        deposit = MoneyDeposited(account_id=account, amount_minor=1_000 + number % 97_531, currency="EUR",
                                 balance_minor=10_000_000 + number, idempotency_key=str(uuid.uuid4()))
        envelope = seal(self.key, "accounts.events.v1", deposit, account, number, correlation_id)
        event = AuditRecord(
            kind=RecordKind.EVENT, topic="accounts.events.v1", partition=number % 3, offset=number,
            event_id=envelope.event_id, event_type=envelope.event_type, producer=envelope.producer,
            aggregate_id=account, correlation_id=correlation_id, occurred_at=now, recorded_at=now,
            envelope=envelope.SerializeToString())
        if number % 10 == 7:
            return replace(event, kind=RecordKind.REJECTION, principal="audit",
                           action=f"accounts.events.v1/{number % 3}/{number}", reason="bad_signature",
                           detail="signature does not verify")
        return event


def batches(records: Records, total: int, size: int) -> Iterator[list[AuditRecord]]:
    done = 0
    while done < total:
        batch = records.take(min(size, total - done))
        done += len(batch)
        yield batch


class SealedRecord:
    """A Kafka record of `access.decisions.v1` as the consumer reads it: a sealed bundle of decisions."""

    def __init__(self, value: bytes, offset: int) -> None:
        self._value, self._offset, self._appended_ms = value, offset, int(time.time() * 1000)

    def value(self) -> bytes:
        return self._value

    def headers(self) -> list[tuple[str, bytes]]:
        return BUNDLE_HEADERS

    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return None

    def timestamp(self) -> tuple[int, int]:
        return TIMESTAMP_LOG_APPEND_TIME, self._appended_ms


def sealed_decisions(ring: KeyRing, count: int, bundle: int) -> list[SealedRecord]:
    """COUNT access decisions (one in twenty denied) sealed into bundles of BUNDLE by the accounts service's key."""
    sealer = DecisionSealer(ring.signing_key("accounts"))
    methods = ["/bastion.accounts.v1.Accounts/GetAccount", "/bastion.accounts.v1.Accounts/Deposit"]
    sealed: list[SealedRecord] = []
    for first in range(0, count, bundle):
        batch = [(access_decision(f"user-{n % PRINCIPALS}", "cli", methods[n % 2], n % 20 != 7,
                           "role customer is allowed" if n % 20 != 7 else "needs one of teller", str(uuid.uuid4())),
                  time.time_ns()) for n in range(first, min(first + bundle, count))]
        sealed += [SealedRecord(value, len(sealed) + 1) for value, _, _ in sealer.bundles(batch)]
    return sealed


class NoDeadLetters:
    """The benchmark's decisions all verify: a dead letter would mean the run measured the wrong thing."""

    def produce(self, *_args: object, **_kwargs: object) -> None:
        raise SystemExit("a benchmark decision was refused by the consumer's checks")


def consume(service: Engine, log: AuditLog, ring: KeyRing, options: argparse.Namespace) -> tuple[float, float, float]:
    """Seconds, this process's CPU seconds and the PostgreSQL session's CPU seconds to take `--decisions` sealed
    decisions through the consumer's checks into the log, `--batch` records per transaction."""
    infra = PROJECT_ROOT / "infra"
    access = load_policy(infra / "event-access.yaml", {entry.name for entry in load_services(infra / "services.yaml")})
    verifier = EnvelopeVerifier(ring.trust_store(), load_trust_policy(infra / "event-trust.yaml", access))
    reader = AuditRecords(verifier, DeadLetters(NoDeadLetters(), "audit"))
    sealed = sealed_decisions(ring, options.decisions, options.bundle)
    me = psutil.Process()
    with service.connect() as conn:
        backend = psutil.Process(int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()))
        conn.rollback()
        cpu, backend_cpu, started = me.cpu_times(), backend.cpu_times(), time.perf_counter()
        pending: list[AuditRecord] = []
        for index, record in enumerate(sealed):
            pending += reader.of(record)
            if len(pending) >= options.batch or index == len(sealed) - 1:
                with conn.begin():
                    log.append(conn, pending)
                pending = []
        seconds = time.perf_counter() - started
        used, backend_used = me.cpu_times(), backend.cpu_times()
    return (seconds, used.user + used.system - cpu.user - cpu.system,
            backend_used.user + backend_used.system - backend_cpu.user - backend_cpu.system)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:>10,.0f} records/s  ({seconds:6.2f} s, {seconds / count * 1e6:7.1f} µs/record)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--url", help="admin URL of a PostgreSQL database (default: the dev stack's `audit`)")
    parser.add_argument("--service-url", help="the audit service role's URL (default: --url with SET ROLE audit)")
    parser.add_argument("--records", type=int, default=100_000, help="records in the log (default 100000)")
    parser.add_argument("--batch", type=int, default=500, help="records per append transaction (default 500)")
    parser.add_argument("--page", type=int, default=1_000, help="rows per fetch when streaming (default 1000)")
    parser.add_argument("--checkpoint-every", type=int, default=10_000, help="records per checkpoint")
    parser.add_argument("--decisions", type=int, default=20_000, help="access decisions consumed (default 20000)")
    parser.add_argument("--bundle", type=int, default=100, help="decisions per sealed bundle (default 100)")
    options = parser.parse_args()
    if options.records <= SINGLE_APPENDS:
        parser.error(f"--records must be above the {SINGLE_APPENDS} single-record appends")

    if options.url:
        admin_url = make_url(options.url)
        service = (create_engine(options.service_url) if options.service_url
                   else as_service_role(create_engine(admin_url)))
    else:
        admin_url, service_url = devstack_urls()
        service = create_engine(service_url)
    admin = create_engine(admin_url)
    schema = f"bench_audit_{uuid.uuid4().hex[:12]}"
    service = service.execution_options(schema_translate_map={AUDIT_SCHEMA: schema})
    log = AuditLog(page=options.page)
    try:
        with admin.begin() as conn:
            install(conn, SERVICE_ROLE, schema=schema)
        with tempfile.TemporaryDirectory(prefix="bench-audit-") as folder:
            ring = KeyRing(Path(folder) / "keys")
            ring.ensure(["accounts", "audit"])
            records = Records(ring.signing_key("accounts"), ring.signing_key("audit"))
            file = CheckpointFile(Path(folder) / "audit-checkpoints.jsonl", ring.trust_store(), ORIGIN)
            checkpointer = Checkpointer(ring.signing_key("audit"), file, every_records=options.checkpoint_every,
                                        every_seconds=3600)

            single = 0.0
            for batch in batches(records, SINGLE_APPENDS, 1):
                started = time.perf_counter()
                with service.begin() as conn:
                    log.append(conn, batch)
                single += time.perf_counter() - started

            batched = 0.0
            head = EMPTY
            for batch in batches(records, options.records - SINGLE_APPENDS, options.batch):
                started = time.perf_counter()
                with service.begin() as conn:
                    log.append(conn, batch)
                    head = log.head(conn)
                checkpointer.maybe_checkpoint(head)  # after the commit, as the service does
                batched += time.perf_counter() - started
            checkpointer.checkpoint(head)
            checkpoints = file.load()

            rss_before = peak_rss_mb()
            started = time.perf_counter()
            with service.connect() as conn:
                conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                report = log.check_chain(conn, checkpoints)
            verifying = time.perf_counter() - started
            rss_after = peak_rss_mb()
            if not report.ok or report.length != options.records:
                raise SystemExit(f"the benchmark log did not verify: {report}")

            started = time.perf_counter()
            with service.begin() as conn:
                rebuilt = rebuild(conn, page=options.page)
            rebuilding = time.perf_counter() - started
            if not rebuilt.matches or rebuilt.replayed != options.records:
                raise SystemExit(f"the rebuilt projections differ from the live ones: {rebuilt}")
            consuming, consumer_cpu, postgres_cpu = consume(service, log, ring, options)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()
        service.dispose()

    n = options.records
    bulk = n - SINGLE_APPENDS
    print(f"audit chain, {n:,} records, PostgreSQL at {admin_url.host}:{admin_url.port}/{admin_url.database}, "
          f"appended as role {SERVICE_ROLE!r}:")
    print(f"  {f'append, {options.batch} records per transaction':<46}{rate(bulk, batched)}")
    print(f"  {'append, 1 record per transaction':<46}{rate(SINGLE_APPENDS, single)}")
    print(f"  {f'verify whole chain, {len(checkpoints)} checkpoints':<46}{rate(n, verifying)}")
    print(f"  {'rebuild projections (truncate + replay)':<46}{rate(n, rebuilding)}")
    print(f"  peak RSS before verifying {rss_before:.0f} MB, after {rss_after:.0f} MB "
          f"(the verifier streams: {options.page}-row pages)")
    print(f"  head {report.head_hash.hex()} at length {report.length}, anchored at {report.anchored_length}")
    decisions = options.decisions
    print(f"  {f'consume access decisions, bundles of {options.bundle}':<46}{decisions / consuming:>10,.0f} "
          f"decisions/s ({consuming:6.2f} s); CPU per decision: consumer {consumer_cpu / decisions * 1e6:.0f} µs, "
          f"PostgreSQL {postgres_cpu / decisions * 1e6:.0f} µs")


if __name__ == "__main__":
    main()
