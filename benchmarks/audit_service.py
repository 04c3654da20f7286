"""Benchmark of the running audit service: CPU per access decision it consumes, end to end on the dev stack.

Run with `make bench-audit-service` (`.venv/bin/python -m benchmarks.audit_service [--decisions N] [--rounds R]`;
uses the dev install in .state and starts it if it is not running; it is left running). Each round publishes N
access decisions (default 10000) on `access.decisions.v1` as the accounts service's interceptors do
(`KafkaAccessAudit`, the service's key and Kafka principal), waits until the audit service has appended every one
of them to its log, and prints the rate from the first decision queued to the last one stored, with the CPU each
component of the dev stack spent per decision over that time (psutil; PostgreSQL with its backends).

The decisions are real signed records in the dev install's audit log, of principals `bench-user-N` with the
reason `bench-audit-service`; `make reset` removes them with the rest of the install. bench-audit measures the
consumer's own code on a scratch schema instead, without Kafka.
"""

import argparse
import time
import uuid

from sqlalchemy import Engine, create_engine, text

from bastion.devstack.components.kafka import Kafka
from bastion.events.keys import KeyRing
from bastion.grpc.audit import KafkaAccessAudit, decision
from benchmarks.audit_chain import devstack_urls
from benchmarks.grpc_chain import group_cpu, stack_context, stack_processes

PRODUCER = "accounts"
REASON = "bench-audit-service"
CATCH_UP_SECONDS = 300.0


def head(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT coalesce(max(seq), 0) FROM audit.log")).scalar_one())


def stored_since(engine: Engine, seq: int) -> int:
    """This benchmark's decisions stored after SEQ (a range of the primary key: cheap to ask every 0.1 s)."""
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM audit.log WHERE seq > :seq AND reason = :reason"),
                                {"seq": seq, "reason": REASON}).scalar_one())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--decisions", type=int, default=10_000, help="access decisions per round (default 10000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    options = parser.parse_args()

    admin_url, _ = devstack_urls()  # starts the dev stack if it is not running
    ctx = stack_context()
    log = create_engine(admin_url)
    audit = KafkaAccessAudit(KeyRing(ctx.layout.event_keys_dir).signing_key(PRODUCER),
                             Kafka(ctx).client_config(PRODUCER, ctx.credentials.kafka[PRODUCER]))
    audit.producer.list_topics("access.decisions.v1", timeout=30)  # connection and SASL before the clock starts
    components = stack_processes(ctx)
    print(f"audit service consuming access decisions on the dev stack, {options.decisions:,} per round; CPU µs per "
          f"decision by component (only those above 1 µs)")
    try:
        for round_number in range(1, options.rounds + 1):
            time.sleep(2)  # let the previous round's work settle
            first, before, started = head(log), group_cpu(components), time.perf_counter()
            for number in range(options.decisions):
                audit.record(decision(f"bench-user-{number % 50}", "cli", "/bastion.accounts.v1.Accounts/GetAccount",
                                      number % 20 != 7, REASON, str(uuid.uuid4())))
            if audit.flush(60):
                raise SystemExit("the decisions could not all be handed to Kafka within 60 s")
            while stored_since(log, first) < options.decisions:
                if time.perf_counter() - started > CATCH_UP_SECONDS:
                    raise SystemExit(f"the audit service did not store the round within {CATCH_UP_SECONDS:.0f} s")
                time.sleep(0.1)
            seconds = time.perf_counter() - started
            after = group_cpu(components)
            count = stored_since(log, first)
            used = sorted(((after[name] - before[name]) * 1e6 / count, name) for name in after if name in before)
            print(f"  round {round_number}: {count:,} stored in {seconds:.1f} s ({count / seconds:,.0f}/s); "
                  + ", ".join(f"{name} {micros:.0f}" for micros, name in reversed(used) if micros > 1))
    finally:
        audit.close()
        log.dispose()


if __name__ == "__main__":
    main()
