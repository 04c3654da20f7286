"""The `bastion` command: set up, start, inspect, stop and reset the platform on this machine."""

import argparse
import datetime as dt
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table
from rich.text import Text
from sqlalchemy import create_engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from bastion.audit import install_tools, refusals
from bastion.audit.alerts import how_often
from bastion.audit.checkpoints import AUDIT_PRODUCER
from bastion.audit.v1 import audit_pb2
from bastion.demo import Scenario
from bastion.devstack import backups
from bastion.devstack.catalog import load_services
from bastion.devstack.components.postgres import Postgres
from bastion.devstack.context import StackContext
from bastion.devstack.errors import DevstackError
from bastion.devstack.layout import StateLayout
from bastion.devstack.retirement import unanchored_if_retired, unpublished_by, unread_by_consumers
from bastion.devstack.stack import NOT_BUILT, Stack
from bastion.events import inbox
from bastion.events.errors import KeyNotFoundError
from bastion.events.keys import FOLLOW_CHECK_SECONDS, KeyRing
from bastion.grpc.server import TlsFiles
from bastion.labs import LABS, find
from bastion.labs.base import exit_status, run_labs
from bastion.labs.platform import LabSetupError, Session
from bastion.labs.scorecard import concerns_of, print_scorecard
from bastion.metrics_endpoint import scrape
from bastion.settings import DevstackSettings
from bastion.trail import printable, trail

console = Console(highlight=False)
errors = Console(stderr=True, highlight=False)


Command = Callable[[argparse.Namespace], int]

def _stack(quiet: bool = False) -> Stack:
    def progress(message: str) -> None:
        if not quiet:
            console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {message}")

    return Stack(DevstackSettings(), progress)


def cmd_setup(args: argparse.Namespace) -> int:
    started = time.monotonic()
    _stack().setup(relock=args.relock)
    console.print(f"[green]set-up complete[/green] in {time.monotonic() - started:.1f}s")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    started = time.monotonic()
    stack = _stack()
    stack.up()
    console.print(f"[green]stack healthy[/green] in {time.monotonic() - started:.1f}s")
    _print_status(stack.status())
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    stopped = _stack().down()
    console.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = _stack(quiet=True).status()
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        _print_status(status)
    return 0 if stack_is_healthy(status) else 1


def stack_is_healthy(status: dict[str, Any]) -> bool:
    """Every component of STATUS (`Stack.status`) healthy, the servers and the services alike; a service declared
    but not built yet is not expected to run."""
    running = [entry for entry in status["components"].values() if entry.get("detail") != NOT_BUILT]
    return bool(running) and all(entry["healthy"] for entry in running)


def cmd_reset(args: argparse.Namespace) -> int:
    if not args.yes:
        errors.print("reset deletes every secret, certificate and all data of this install; add --yes to confirm")
        return 2
    _stack().reset()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    started = time.monotonic()
    stack = _stack()
    stack.up()
    status = stack.status()
    _print_status(status)
    console.print("\n[bold]The scenario[/bold]")
    Scenario(stack.context(), lambda line: console.print(f"  [green]✓[/green] {line}")).run()
    console.print(
        f"\n[green]Every step of the scenario succeeded[/green] ({time.monotonic() - started:.1f}s to start the "
        "platform and run the scenario).\n"
        f"  secrets:      {status['credentials_file']}\n  certificates: {status['pki_dir']}\n"
        f"  logs:         {stack.layout.log_dir} (one file per component)\n"
        f"  look next:    `{_command()} status`, `{_command()} audit verify`, `{_command()} lab list` (attacks and "
        "the defences that stop them)\n"
        "  stop:         `make down` (data kept); `make reset` wipes the install"
    )
    return 0


def _command() -> str:
    """How to call this command from the shell it runs in: `bastion` when on the PATH, else the venv's path."""
    return "bastion" if shutil.which("bastion") else ".venv/bin/bastion"


def cmd_audit_verify(args: argparse.Namespace) -> int:
    result = install_tools.verify(_stack().context())
    report = result.report
    head = report.head_hash.hex() or "-"
    if report.ok:
        console.print(f"[green]audit chain verified[/green]: {report.length} records, head {head}; "
                      f"{result.checkpoints} signed checkpoints, the newest covers {result.checkpoint_length} "
                      f"records ({report.length - report.anchored_length} newer ones are chained, not yet signed)"
                      + (f"; {result.superseded} checkpoints of retired audit keys superseded by a later one"
                         if result.superseded else "")
                      + (f"; the file holds all {result.published} checkpoints published on audit.checkpoints.v1"
                         if result.published else "; no checkpoint published on audit.checkpoints.v1 yet"))
        return 0
    where = f" at seq {report.first_bad_seq}" if report.first_bad_seq else ""
    errors.print(f"audit chain NOT verified{where}: {escape(report.reason)}\n"
                 f"  the first {report.length} records verify (head {head})")
    return 1


def cmd_audit_rebuild(args: argparse.Namespace) -> int:
    rebuilt = install_tools.rebuild_projections(_stack().context())
    verdict = "identical to" if rebuilt.matches else "DIFFERENT from"
    console.print(f"projections rebuilt from {rebuilt.replayed} log records: {verdict} the live ones")
    for name in sorted(rebuilt.rebuilt):
        mark = "=" if rebuilt.live.get(name) == rebuilt.rebuilt[name] else "≠"
        console.print(f"  {name:<16} {mark} {rebuilt.rebuilt[name][:16]}")
    return 0 if rebuilt.matches else 1


Answer = TypeVar("Answer")


def _ask_audit(question: Callable[[StackContext, float, int], list[Answer]], args: argparse.Namespace
               ) -> list[Answer] | None:
    """QUESTION's answer from the audit service (as the realm's auditor), or None once the refusal is printed."""
    try:
        return question(_stack(quiet=True).context(), args.minutes, args.limit)
    except grpc.RpcError as error:
        errors.print(f"the audit service refused or did not answer: {error.code().name}: "
                     f"{escape(str(error.details()))}")
        return None


def _when(event: audit_pb2.AuditEvent) -> str:
    return str(event.occurred_at.ToDatetime(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"))


def _how_many(found: int, args: argparse.Namespace, what: str) -> str:
    """The heading of a list of the newest records: all of them, or the newest --limit of more."""
    if found < args.limit:
        return f"{found} {what} in the last {args.minutes:g} minutes"
    return f"the newest {found} {what} of the last {args.minutes:g} minutes (there may be more: raise --limit)"


def cmd_audit_refusals(args: argparse.Namespace) -> int:
    found = _ask_audit(refusals.recent_refusals, args)
    if found is None:
        return 1
    console.print(f"{_how_many(len(found), args, 'refusals')}, oldest first:")
    for event in found:
        # Escaped as in the trail: the action is the method path a caller sent, control characters and all.
        console.print(printable(f"  {event.seq:>8} {_when(event)} {event.kind:<9} {event.decision or '-':<5} "
                                f"{event.principal or '-'} {event.action or event.topic} {event.reason[:120]} "
                                f"(correlation id {event.correlation_id})"), soft_wrap=True, markup=False,
                      highlight=False)
    return 0


def cmd_audit_alerts(args: argparse.Namespace) -> int:
    found = _ask_audit(refusals.recent_alerts, args)
    if found is None:
        return 1
    console.print(f"{_how_many(len(found), args, 'security alerts')}, oldest first (rules: infra/alert-rules.yaml):")
    for event, alert in found:
        if isinstance(alert, str):
            console.print(f"  {event.seq:>8} {_when(event)} unreadable: {alert}", markup=False, highlight=False)
            continue
        console.print(f"  {event.seq:>8} {_when(event)} {alert.severity:<8} {alert.rule}: {alert.counted_by} "
                      f"{alert.key!r} refused {how_often(alert.count)} within {alert.window_seconds}s (log entries "
                      f"{alert.first_seq} to {alert.last_seq}; last correlation id {alert.last_correlation_id})",
                      soft_wrap=True, markup=False, highlight=False)
    return 0


def _page_limit(text: str) -> int:
    """An argparse type: a whole number from 1 to 500 (a usage error otherwise, exit 2)."""
    if not text.isdecimal() or not 1 <= int(text) <= 500:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1 to 500")
    return int(text)


MAX_MINUTES = 10 * 366 * 24 * 60  # ten years: far enough back for any window, and a time a datetime can hold


def _minutes(text: str) -> float:
    """An argparse type: a number of minutes above 0 and at most ten years (a usage error otherwise, exit 2)."""
    try:
        minutes = float(text)
    except ValueError:
        minutes = math.nan
    if not 0 < minutes <= MAX_MINUTES:  # false for nan too
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of minutes above 0 and at most {MAX_MINUTES}")
    return minutes


def cmd_events_held(args: argparse.Namespace) -> int:
    """Each service's events held behind a sequence gap: what it waits for, since when, whether it was reported."""
    ctx = _stack(quiet=True).context()
    postgres = Postgres(ctx)
    total = 0
    for service in ctx.service_names:
        engine = create_engine(postgres.sqlalchemy_url(service, ctx.credentials.postgres[service], service),
                               poolclass=NullPool)
        try:
            with engine.connect() as conn:
                found = inbox.held_aggregates(conn, args.limit)
        except SQLAlchemyError as error:
            raise DevstackError(f"cannot read {service}'s held events: {type(error).__name__}",
                                "is the stack running (`bastion status`)?") from None
        finally:
            engine.dispose()
        for aggregate in found:
            reported = (f"reported behind {aggregate.reported_gap}" if aggregate.reported_gap is not None
                        else "not reported yet")
            console.print(f"  {service}: {aggregate.producer} {aggregate.aggregate_id} on {aggregate.topic}: waits "
                          f"for {aggregate.waiting_for}; {aggregate.held} event(s) held since "
                          f"{aggregate.held_since.isoformat(timespec='seconds')}; {reported}",
                          soft_wrap=True, markup=False, highlight=False)
        total += len(found)
    console.print(f"{total} aggregate(s) with events held behind a sequence gap (docs/events.md, "
                  "\"A gap that stays open\")")
    return 0


def _event_keys() -> KeyRing:
    return KeyRing(StateLayout(DevstackSettings().state_dir).event_keys_dir)


def cmd_trail(args: argparse.Namespace) -> int:
    steps = trail(_stack(quiet=True).context(), args.correlation_id, args.minutes, args.limit)
    if not steps:
        window = "in the audit log" if args.minutes is None else f"of the last {args.minutes:g} minutes"
        errors.print(f"nothing carries correlation id {escape(repr(args.correlation_id))}: no service logged it and "
                     f"no audit record {window} has it")
        return 1
    if not console.is_terminal:  # piped or redirected: one whole line per step, ids never split for a table
        for step in steps:
            text = step.text.replace("\r", "\\r").replace("\n", "\\n")  # a recorded reason may hold a line break
            console.print(f"{step.at.strftime('%H:%M:%S.%f')[:-3]}  {step.source}  {text}", soft_wrap=True,
                          markup=False, highlight=False)
        return 0
    table = Table("time (UTC)", "where")
    table.add_column("what", overflow="fold")
    for step in steps:
        # Text, not markup: a step holds a caller's text (a method path such as `/x/[/b]` would stop the trail with
        # a MarkupError, `[on black]` hide what follows), shown as it is, like the piped lines above.
        table.add_row(step.at.strftime("%H:%M:%S.%f")[:-3], step.source, Text(step.text))
    console.print(table)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    if not _event_keys().trust_store_file.exists():
        raise DevstackError("no event keys yet", "run `make setup` (or `bastion setup`) first")
    table = Table("producer", "state", "created")
    table.add_column("key id", overflow="fold")
    raw = json.loads(_event_keys().trust_store_file.read_text())
    for producer, keys in sorted(raw["producers"].items()):
        for key_id, entry in sorted(keys.items(), key=lambda item: item[1]["created_at"]):
            table.add_row(producer, entry["state"], entry["created_at"][:19], key_id)
    console.print(table)
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    if args.producer not in {s.name for s in load_services(DevstackSettings().infra_dir / "services.yaml")}:
        raise DevstackError(f"{args.producer!r} is not a service", "name one of infra/services.yaml")
    key_id = _event_keys().rotate(args.producer)
    console.print(f"{args.producer} signs with {key_id} within {FOLLOW_CHECK_SECONDS:g} s (running services follow the "
                  "key ring); the previous key still verifies until retired")
    return 0


def cmd_keys_retire(args: argparse.Namespace) -> int:
    state = _event_keys().state(args.producer, args.key_id)
    if state is None:
        errors.print(f"bastion keys retire: {escape(args.producer)} has no key {escape(args.key_id)}")
        return 2
    if state == "active":
        errors.print(f"bastion keys retire: {args.key_id} is {args.producer}'s active key: rotate before retiring it")
        return 2
    unanchored = None
    if args.producer == AUDIT_PRODUCER and state != "retired":
        unanchored = unanchored_if_retired(_stack(quiet=True).layout, args.key_id, 0 if args.force else None)
        if unanchored and not args.force:
            errors.print(f"bastion keys retire: not retired: {args.key_id}'s checkpoints would be all that vouches "
                         f"for the audit log ({unanchored})\n  -> start the audit service (`bastion up`): it signs "
                         "with its new key within seconds of a rotation; then retire again. Or add --force to retire "
                         "it now (a leaked audit key also signs security alerts): `bastion audit verify` then fails "
                         "until the audit service has signed with its new key")
            return 2
    if not args.force and state != "retired":
        unread = unread_by_consumers(_stack(quiet=True), args.producer)
        if unread:
            errors.print(f"bastion keys retire: not retired: consumers have not read everything {args.producer} wrote "
                         f"so far ({', '.join(unread)}); events signed with {args.key_id} may be among them and "
                         "would be refused\n  -> retire once they have caught up, or add --force")
            return 2
    try:
        _event_keys().retire(args.producer, args.key_id)
    except KeyError:
        errors.print(f"bastion keys retire: {escape(args.producer)} has no key {escape(args.key_id)}")
        return 2
    except KeyNotFoundError as error:
        errors.print(f"bastion keys retire: {escape(str(error))}")
        return 2
    console.print(f"{args.key_id} retired: running consumers refuse events signed with it within "
                  f"{FOLLOW_CHECK_SECONDS:g} s" + ("; the checkpoints it signed are superseded by the newer key's"
                                                   if args.producer == AUDIT_PRODUCER and not unanchored else ""))
    if unanchored:
        errors.print(f"bastion keys retire: warning: `bastion audit verify` fails until the audit service has signed "
                     f"with its new key (it does within seconds once running, over a log that still matches the "
                     f"checkpoints it found): {unanchored}")
    return 0


def cmd_data_keys_list(args: argparse.Namespace) -> int:
    listed = _stack(quiet=True).data_keys().listing()
    if not listed:
        raise DevstackError("no data keys yet", "run `make setup` (or `bastion setup`) first")
    table = Table("topic", "state", "created", "held by")
    table.add_column("key id", overflow="fold")
    for key in listed:
        table.add_row(key.topic, key.state, key.created_at[:19], ", ".join(key.holders) or "-", key.key_id)
    console.print(table)
    return 0


def cmd_data_keys_rotate(args: argparse.Namespace) -> int:
    key_id = _stack(quiet=True).data_keys().rotate(args.topic)
    console.print(f"personal fields of {args.topic} are sealed under {key_id} from now on (running services read "
                  "their keys on every use); fields sealed before still open with the previous key until it is retired")
    return 0


def cmd_data_keys_retire(args: argparse.Namespace) -> int:
    stack = _stack(quiet=True)
    keys = stack.data_keys()
    state = keys.state(args.topic, args.key_id)
    if state is None:
        errors.print(f"bastion keys data retire: {escape(args.topic)} has no data key {escape(args.key_id)}")
        return 2
    if state == "active":
        errors.print(f"bastion keys data retire: {args.key_id} is the active key of {args.topic}: rotate before "
                     "retiring it")
        return 2
    if not args.force and state != "retired":
        producers = keys.producers(args.topic)
        waiting = {producer: unpublished_by(stack, producer, args.topic) for producer in producers}
        if any(waiting.values()):
            errors.print(f"bastion keys data retire: not retired: events of {args.topic} still wait in an outbox ("
                         + ", ".join(f"{producer}: {count}" for producer, count in waiting.items() if count)
                         + f"); fields sealed under {args.key_id} may be among them\n  -> retire once the relays "
                         "have published them (`bastion up`), or add --force")
            return 2
        unread = [where for producer in producers for where in unread_by_consumers(stack, producer)]
        if unread:
            errors.print(f"bastion keys data retire: not retired: consumers have not read everything the producers "
                         f"of {args.topic} published so far ({', '.join(unread)}); fields sealed under {args.key_id} "
                         "may be among them and could no longer be opened\n  -> retire once they have caught up, or "
                         "add --force")
            return 2
    keys.retire(args.topic, args.key_id)
    console.print(f"{args.key_id} retired: deleted from the issuer and from every service's copy; the event fields "
                  "sealed under it, in Kafka and in the audit log, can no longer be read by anyone (crypto-shredding)")
    return 0


def cmd_backup_create(args: argparse.Namespace) -> int:
    started = time.monotonic()
    folder = backups.create(_stack(quiet=True).context(), args.database or None)
    verified = backups.verify(_stack(quiet=True).context(), folder, decrypt=False)
    total = sum(entry["bytes"] for entry in verified.databases.values())
    console.print(f"backup {folder.name}: {', '.join(sorted(verified.databases))} ({total:,} bytes encrypted, "
                  f"manifest signed) in {time.monotonic() - started:.1f}s\n  {folder}")
    return 0


def cmd_backup_list(args: argparse.Namespace) -> int:
    ctx = _stack(quiet=True).context()
    table = Table("backup", "databases", "bytes", "signed manifest")
    failed = 0
    for folder in backups.listed(ctx):
        try:
            verified = backups.verify(ctx, folder, decrypt=False)
        except backups.BackupError as error:
            table.add_row(folder.name, "-", "-", f"[red]NOT verified[/red]: {escape(error.problem)}")
            failed += 1
            continue
        table.add_row(folder.name, ", ".join(sorted(verified.databases)),
                      f"{sum(entry['bytes'] for entry in verified.databases.values()):,}", "verified")
    console.print(table)
    return 1 if failed else 0  # a backup that does not verify is a problem found


def cmd_backup_verify(args: argparse.Namespace) -> int:
    ctx = _stack(quiet=True).context()
    folders = [backups.find(ctx, args.name)] if args.name else backups.listed(ctx)
    if not folders:
        raise DevstackError("no backups yet", "make one with `bastion backup create`")
    failed = 0
    for folder in folders:
        try:
            verified = backups.verify(ctx, folder, decrypt=not args.no_decrypt)
        except backups.BackupError as error:
            errors.print(f"backup {folder.name} NOT verified: {escape(error.problem)}\n  -> {escape(error.remedy)}")
            failed += 1
            continue
        checked = "signature, digests" + ("" if args.no_decrypt else " and decryption")
        console.print(f"[green]backup {folder.name} verified[/green] ({checked}): "
                      f"{', '.join(sorted(verified.databases))}")
    return 1 if failed else 0


def cmd_backup_restore(args: argparse.Namespace) -> int:
    ctx = _stack(quiet=True).context()
    target = backups.restore(ctx, backups.find(ctx, args.name), args.database)
    console.print(f"backup {args.name} verified, and {args.database} restored into the new database {target} "
                  "(the live database is untouched)")
    return 0


def cmd_lab_list(args: argparse.Namespace) -> int:
    # A lab's name is printed whole: a name cut short cannot be run.
    table = Table(Column("lab", no_wrap=True, overflow="ignore"), "attack", "concerns of docs/security.md it proves")
    for lab in LABS:
        table.add_row(lab.name, lab.title, "; ".join(concerns_of(lab.name)))
    console.print(table)
    return 0


def cmd_lab_run(args: argparse.Namespace) -> int:
    if args.all == bool(args.name):
        errors.print("bastion lab run: name one lab, or --all (`bastion lab list` shows them)")
        return 2
    lab = None if args.all else find(args.name)
    if not args.all and lab is None:
        errors.print(f"bastion lab run: no lab {escape(repr(args.name))} (`bastion lab list` shows them)")
        return 2
    try:
        session = Session.of_running_stack(DevstackSettings())
    except LabSetupError as error:
        errors.print(f"[red]bastion lab run: {escape(str(error))}[/red]")
        return 2
    try:
        results = run_labs(LABS if lab is None else (lab,), session, console)
    finally:
        session.close()
    if args.all:
        print_scorecard(results, console)
    return exit_status(results)


def cmd_metrics(args: argparse.Namespace) -> int:
    """Scrape SERVICE's metrics endpoint with the cli certificate; print the samples whose line holds MATCH."""
    ctx = _stack(quiet=True).context()
    if args.service not in ctx.service_names:
        errors.print(f"bastion metrics: no service {escape(repr(args.service))} (see infra/services.yaml)")
        return 2
    client = ctx.pki.paths("cli")
    url = f"https://{ctx.settings.public_host}:{ctx.metrics_port(args.service)}/metrics"
    try:
        text = scrape(url, TlsFiles(client.cert, client.key, ctx.ca_file))
    except OSError as error:
        errors.print(f"[red]bastion metrics: {url} did not answer ({escape(str(error))}); is it up (`bastion "
                     "status`)?[/red]")
        return 1
    shown = [line for line in text.splitlines() if not line.startswith("#") and args.match in line]
    for line in shown:
        print(line)
    if not shown:
        errors.print(f"no sample matches {escape(repr(args.match))} yet: a labelled counter appears with its first "
                     "event")
    return 0


def _print_status(status: dict[str, object]) -> None:
    table = Table("component", "healthy", "pid", "address")
    components: dict[str, dict[str, object]] = status["components"]  # type: ignore[assignment]
    for name, entry in components.items():
        address = entry.get("bootstrap") or entry.get("issuer") or entry.get("grpc") or entry.get("address") or ""
        healthy = "[green]yes[/green]" if entry["healthy"] else "[red]no[/red]"
        detail = f" ({entry['detail']})" if entry.get("detail") else ""
        table.add_row(name, healthy + detail, str(entry.get("pid") or "-"), str(address))
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bastion", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    setup = sub.add_parser("setup", help="fetch pinned servers, generate PKI and secrets (idempotent)")
    setup.add_argument("--relock", action="store_true", help="re-pin the SHA-256 of fetched distributions")
    setup.set_defaults(func=cmd_setup)
    sub.add_parser("up", help="start whatever is not running and wait until healthy").set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop every component, keep the data").set_defaults(func=cmd_down)
    status = sub.add_parser("status", help="health of every component")
    status.add_argument("--json", action="store_true", help="print the status contract as JSON")
    status.set_defaults(func=cmd_status)
    reset = sub.add_parser("reset", help="stop everything and wipe the state folder")
    reset.add_argument("--yes", action="store_true", help="confirm that all local data may be deleted")
    reset.set_defaults(func=cmd_reset)
    sub.add_parser("demo", help="start the platform and show it working").set_defaults(func=cmd_demo)
    metrics = sub.add_parser("metrics", help="a service's counters (refusals, rejected events, ...), read over "
                                             "its mutual-TLS metrics endpoint")
    metrics.add_argument("service")
    metrics.add_argument("--match", default="bastion_", help="print only samples containing this (default bastion_)")
    metrics.set_defaults(func=cmd_metrics)
    audit = sub.add_parser("audit", help="the audit trail: verify the chain, rebuild projections").add_subparsers(
        dest="audit_command", required=True)
    audit.add_parser("verify", help="recompute the hash chain and check it against the signed checkpoints"
                     ).set_defaults(func=cmd_audit_verify)
    audit.add_parser("rebuild", help="rebuild the projections by replaying the whole log"
                     ).set_defaults(func=cmd_audit_rebuild)
    recent = audit.add_parser("refusals", help="the calls denied and the events refused lately, as the auditor "
                              "reads them from the audit service")
    recent.add_argument("--minutes", type=_minutes, default=60.0, help="how far back (default 60)")
    recent.add_argument("--limit", type=int, default=50, help="the newest this many at most (default 50)")
    recent.set_defaults(func=cmd_audit_refusals)
    alerts = audit.add_parser("alerts", help="the security alerts the audit service raised lately over the refusals "
                              "(infra/alert-rules.yaml)")
    alerts.add_argument("--minutes", type=_minutes, default=60.0, help="how far back (default 60)")
    alerts.add_argument("--limit", type=int, default=50, help="the newest this many at most (default 50)")
    alerts.set_defaults(func=cmd_audit_alerts)
    lab = sub.add_parser("lab", help="attack labs: each attack against the running stack, and the defence that "
                         "stops it").add_subparsers(dest="lab_command", required=True)
    lab.add_parser("list", help="the labs and the concerns they prove").set_defaults(func=cmd_lab_list)
    run = lab.add_parser("run", help="run lab NAME, or --all with a scorecard; exit 0 only if the defences held")
    run.add_argument("name", nargs="?", help="a lab of `bastion lab list`")
    run.add_argument("--all", action="store_true", help="every lab, then one scorecard line per concern")
    run.set_defaults(func=cmd_lab_run)
    backup = sub.add_parser("backup", help="encrypted, signed backups of the databases: create, list, verify, "
                            "restore").add_subparsers(dest="backup_command", required=True)
    create = backup.add_parser("create", help="dump every database (or --database NAME), encrypted to the "
                               "install's backup key, with a signed manifest")
    create.add_argument("--database", action="append", help="only this database (repeatable)")
    create.set_defaults(func=cmd_backup_create)
    backup.add_parser("list", help="the backups and whether their manifests verify").set_defaults(
        func=cmd_backup_list)
    check = backup.add_parser("verify", help="check NAME (or every backup): signature, digests, decryption; exit 1 "
                              "if one does not verify")
    check.add_argument("name", nargs="?")
    check.add_argument("--no-decrypt", action="store_true", help="signature and digests only (no identity needed)")
    check.set_defaults(func=cmd_backup_verify)
    restore = backup.add_parser("restore", help="verify backup NAME, then restore DATABASE into a new database")
    restore.add_argument("name")
    restore.add_argument("database")
    restore.set_defaults(func=cmd_backup_restore)
    events = sub.add_parser("events", help="the verifying consumers' state").add_subparsers(
        dest="events_command", required=True)
    held = events.add_parser("held", help="events held behind a gap in their aggregate's sequence, per service")
    held.add_argument("--limit", type=_page_limit, default=200, help="aggregates per service, at most (1 to 500)")
    held.set_defaults(func=cmd_events_held)
    follow = sub.add_parser("trail", help="one request through the platform: every service log line and audit record "
                            "with its correlation id, in time order")
    follow.add_argument("correlation_id")
    follow.add_argument("--minutes", type=_minutes, default=None,
                        help="only audit records of the last MINUTES (default: the whole log, looked up by its index)")
    follow.add_argument("--limit", type=_page_limit, default=500,
                        help="at most this many audit records (1 to 500, default 500)")
    follow.set_defaults(func=cmd_trail)
    keys = sub.add_parser("keys", help="event signing keys (and `keys data`: data keys): list, rotate, retire"
                          ).add_subparsers(dest="keys_command", required=True)
    _key_commands(keys, "producer", cmd_keys_list, cmd_keys_rotate, cmd_keys_retire, (
        "every producer's keys and their state", "give PRODUCER a new signing key",
        "stop verifying KEY_ID of PRODUCER",
        "retire without waiting for the consumers to read what the producer wrote so far"))
    data = keys.add_parser("data", help="data keys of personal fields: list, rotate, retire").add_subparsers(
        dest="data_keys_command", required=True)
    _key_commands(data, "topic", cmd_data_keys_list, cmd_data_keys_rotate, cmd_data_keys_retire, (
        "every topic's data keys, their state and who holds them",
        "seal TOPIC's personal fields under a new data key",
        "delete KEY_ID of TOPIC everywhere: crypto-shreds what it sealed",
        "retire without waiting for the consumers to read what was sealed so far"))
    return parser


def _key_commands(parsers: Any, owner: str, listing: Command, rotating: Command, retiring: Command,
                  helps: tuple[str, str, str, str]) -> None:
    """`list`, `rotate OWNER` and `retire OWNER KEY_ID [--force]` under PARSERS, with their HELPS in that order (the
    last for --force)."""
    parsers.add_parser("list", help=helps[0]).set_defaults(func=listing)
    rotate = parsers.add_parser("rotate", help=helps[1])
    rotate.add_argument(owner)
    rotate.set_defaults(func=rotating)
    retire = parsers.add_parser("retire", help=helps[2])
    retire.add_argument(owner)
    retire.add_argument("key_id")
    retire.add_argument("--force", action="store_true", help=helps[3])
    retire.set_defaults(func=retiring)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except DevstackError as error:
        # Problems and remedies name what the operator typed, files and servers' words: text, never rich markup
        # (a "[/x]" would raise again here, a "[bold]" vanish from the message).
        errors.print(f"[red]bastion {args.command}: {escape(error.problem)}[/red]\n  -> {escape(error.remedy)}")
        return 2
    except KeyboardInterrupt:
        errors.print(f"bastion {args.command}: interrupted")
        return 130
    except ValidationError as error:
        if error.title != DevstackSettings.__name__:
            raise
        for problem in error.errors():
            name = f"BASTION_{str(problem['loc'][0]).upper()}" if problem["loc"] else "BASTION_*"
            errors.print(f"[red]bastion {args.command}: invalid setting {escape(name)}="
                         f"{escape(repr(problem.get('input'))[:80])}: {escape(problem['msg'])}[/red]")
        errors.print("  -> fix or unset it (docs/configuration.md lists every setting)")
        return 2
    except Exception as error:  # a failure we did not foresee still ends with one line, not a stack trace
        errors.print(f"[red]bastion {args.command}: unexpected {type(error).__name__}: {escape(str(error))}[/red]\n"
                     "  -> the component logs are in the state folder's logs/; please report this")
        return 3
    return code


if __name__ == "__main__":
    sys.exit(main())
