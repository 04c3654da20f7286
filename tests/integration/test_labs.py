"""The attack labs on the test stack: every lab of the catalogue holds when run as a user runs it (`bastion lab
run NAME`), `--all` prints one scorecard line per concern of docs/security.md, and a lab pointed at a deliberately
weakened copy of its control (a validator that accepts any token, a handler without its object-level check, a
verifier that skips signatures) does not hold, while the same lab against the intact copy does."""

import asyncio
import io
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import jwt
import pytest
from rich.console import Console
from sqlalchemy import Connection, create_engine, select

from bastion.accounts.v1 import accounts_pb2, accounts_pb2_grpc
from bastion.audit.chain import Head
from bastion.audit.checkpoints import sign_checkpoint
from bastion.audit.install_tools import ORIGIN
from bastion.devstack import distributions, python_lock
from bastion.devstack.components.kafka import Kafka
from bastion.devstack.components.keycloak import Keycloak
from bastion.devstack.components.postgres import Postgres
from bastion.devstack.context import StackContext
from bastion.devstack.event_access import EventAccessPolicy, TopicPolicy
from bastion.events.catalog import SCHEMAS
from bastion.events.consumer import ConsumerSettings, VerifyingConsumer
from bastion.events.keys import KeyRing
from bastion.events.storage import EVENTS_METADATA, inbox
from bastion.events.trust import TrustPolicy
from bastion.events.verify import EnvelopeVerifier, VerifiedEvent, parse_envelope
from bastion.grpc.audit import MemoryAccessAudit
from bastion.grpc.policy import load_method_policy
from bastion.grpc.server import ServerSecurity, start_server
from bastion.grpc.tokens import JwksCache, Principal, TokenValidator, jwks_url
from bastion.labs import LABS, find
from bastion.labs.base import LabResult, Outcome, exit_status, run_lab
from bastion.labs.keys import verdict_on_copy
from bastion.labs.logs import untouched_since
from bastion.labs.personal import in_clear_or_sealed
from bastion.labs.platform import EventRoute, Session, Target
from bastion.labs.scorecard import CONCERNS, SECTIONS, Status
from bastion.settings import PROJECT_ROOT
from services.accounts.adapters.grpc import AccountsServicer
from services.accounts.domain import Account, AccountNotFoundError
from services.accounts.fakes import MemoryPersonalData, MemoryUnitOfWork
from services.accounts.handlers import AccountsHandlers, Caller
from tests.integration.conftest import bastion
from tests.integration.grpc_harness import ProbeServer, tls_of

WIDE = {"COLUMNS": "400"}  # one evidence item per line in the captured output


# --- the catalogue, the scorecard and docs/security.md agree (no stack needed) ---


def security_sections() -> list[tuple[str, list[str]]]:
    """The sections of docs/security.md and the first cell of each row of their tables."""
    sections: list[tuple[str, list[str]]] = []
    for line in (PROJECT_ROOT / "docs" / "security.md").read_text().splitlines():
        if line.startswith("## "):
            sections.append((line.removeprefix("## ").strip(), []))
        elif line.startswith("| ") and not line.startswith("| concern |") and sections:
            sections[-1][1].append(line.split("|")[1].strip())
    return sections


def test_the_scorecard_has_the_sections_and_rows_of_the_security_guide_and_only_known_labs() -> None:
    assert [(section, [c.title for c in concerns]) for section, concerns in SECTIONS] == security_sections()
    names = {lab.name for lab in LABS}
    assert len(names) == len(LABS)
    assert {name for concern in CONCERNS for name in concern.labs} == names, "every lab proves a concern"
    assert all(bool(concern.labs) != bool(concern.not_covered) for concern in CONCERNS)


def test_the_lab_column_of_docs_security_md_names_the_labs_of_the_scorecard() -> None:
    documented = {}
    for line in (PROJECT_ROOT / "docs" / "security.md").read_text().splitlines():
        if line.startswith("| ") and not line.startswith("| concern |"):
            cells = [cell.strip() for cell in line.split("|")[1:-1]]
            documented[cells[0]] = tuple(name.strip(" `") for name in cells[3].split(",")) if cells[3] != "-" else ()
    assert documented == {concern.title: concern.labs for concern in CONCERNS}


# --- every lab on the running test stack, as a user runs it ---


@pytest.mark.parametrize("name", [lab.name for lab in LABS])
def test_each_lab_holds_and_names_its_evidence(stack: Any, name: str) -> None:
    lab = find(name)
    assert lab is not None
    result = bastion("lab", "run", name, env=WIDE, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "HELD: the defence fired" in result.stdout
    assert "✗" not in result.stdout
    evidence = [line for line in result.stdout.splitlines() if line.lstrip().startswith("✓")]
    assert any(lab.expect in line for line in evidence), f"no evidence names {lab.expect!r}:\n{result.stdout}"


def test_all_runs_every_lab_and_prints_one_scorecard_line_per_concern(stack: Any) -> None:
    result = bastion("lab", "run", "--all", env=WIDE, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("HELD: the defence fired") == len(LABS)
    scorecard = result.stdout.split("Scorecard", 1)[1].splitlines()
    for concern in CONCERNS:
        [line] = [line for line in scorecard if f" {concern.title}: " in line]
        expected = Status.HELD if concern.labs else Status.NOT_COVERED
        assert re.match(rf"\s+{expected.value}\s", line), line
        assert concern.not_covered in line if not concern.labs else all(lab in line for lab in concern.labs)


def test_an_unknown_lab_or_no_lab_is_a_usage_error(stack: Any) -> None:
    assert bastion("lab", "run", "no-such-lab").returncode == 2
    assert bastion("lab", "run").returncode == 2


def test_a_stack_that_is_not_running_is_a_set_up_error(stack: Any, tmp_path: Any) -> None:
    result = bastion("lab", "run", "forged-token", env={"BASTION_STATE_DIR": str(tmp_path / "nothing-here")})
    message = " ".join(result.stderr.split())  # as printed, wrapped to the terminal
    assert result.returncode == 2
    assert "is not running" in message and "start it with `bastion up`" in message


# --- the labs notice a control that is switched off ---


def session_on(ctx: StackContext, **changes: Any) -> Session:
    """A session on the test stack with some of the target pointed elsewhere; no waiting for context evidence
    that a stand-in cannot produce."""
    return Session(ctx, replace(Target.running_stack(ctx), context_wait_seconds=0, **changes))


def run(ctx: StackContext, name: str, **changes: Any) -> LabResult:
    lab = find(name)
    assert lab is not None
    session = session_on(ctx, **changes)
    try:
        return run_lab(lab, session, Console(file=io.StringIO(), width=400))
    finally:
        session.close()


def attack_got_through(result: LabResult) -> list[str]:
    """The evidence of the attack getting through, once sure the lab would exit 1 for it."""
    assert exit_status({result.lab.name: result}) == 1
    return [f"{item.what}: {item.observed}" for item in result.evidence if item.held is False]


class AcceptsAnyToken:
    """The authentication control switched off: reads a token's claims and believes them."""

    def validate(self, token: str, may_fetch: bool = True) -> Principal:
        claims = jwt.decode(token, options={"verify_signature": False})
        return Principal(claims["sub"], claims.get("preferred_username"), claims["azp"],
                         frozenset(claims.get("realm_access", {}).get("roles", [])), claims.get("jti"),
                         int(claims["exp"]))


class WithoutObjectCheck(AccountsHandlers):
    """The object-level check switched off: any caller the method policy admits reads any account."""

    def get_account(self, caller: Caller, account_id: str) -> Account:
        with self.unit_of_work() as uow:
            account = uow.accounts.get(account_id)
        if account is None:
            raise AccountNotFoundError("account not found")
        return account


def start_accounts(ctx: StackContext, validator: Any, handlers: AccountsHandlers) -> ProbeServer:
    """An accounts server on a free port with the real kit (mTLS, interceptor, the accounts method policy) over
    in-memory accounts, in a thread with its own event loop."""
    loop = asyncio.new_event_loop()
    ready: dict[str, Any] = {}

    async def boot() -> None:
        security = ServerSecurity("accounts", tls_of(ctx, "accounts"), validator,
                                  load_method_policy(PROJECT_ROOT / "infra" / "policies" / "accounts.yaml"),
                                  MemoryAccessAudit())
        server, port = await start_server(
            security, lambda s: accounts_pb2_grpc.add_AccountsServicer_to_server(AccountsServicer(handlers), s),
            [accounts_pb2.DESCRIPTOR.services_by_name["Accounts"]])
        ready.update(server=server, port=port)

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(boot())
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while "port" not in ready and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "port" in ready, "the accounts stand-in did not start"
    return ProbeServer(ready["port"], loop, ready["server"], thread)


def realm_validator(ctx: StackContext) -> TokenValidator:
    issuer = Keycloak(ctx).issuer
    return TokenValidator(issuer, "accounts", JwksCache.from_url(
        jwks_url(issuer), ssl.create_default_context(cafile=str(ctx.ca_file))))


@pytest.mark.parametrize("switched_off", [False, True], ids=["intact", "accepts-any-token"])
def test_the_forged_token_lab_fails_against_a_validator_that_accepts_anything(
    stack: Any, ctx: StackContext, switched_off: bool,
) -> None:
    validator = AcceptsAnyToken() if switched_off else realm_validator(ctx)
    server = start_accounts(ctx, validator, AccountsHandlers(MemoryUnitOfWork(), MemoryPersonalData()))
    try:
        result = run(ctx, "forged-token", addresses={**Target.running_stack(ctx).addresses,
                                                     "accounts": f"localhost:{server.port}"})
    finally:
        server.stop()
    if not switched_off:
        assert result.outcome is Outcome.HELD, result
        return
    got_through = attack_got_through(result)
    assert len(got_through) == 3 and all("accepted" in line for line in got_through), got_through


@pytest.mark.parametrize("handlers", [AccountsHandlers, WithoutObjectCheck], ids=["intact", "no-object-check"])
def test_the_other_customer_lab_fails_against_a_handler_without_the_object_level_check(
    stack: Any, ctx: StackContext, handlers: type[AccountsHandlers],
) -> None:
    server = start_accounts(ctx, realm_validator(ctx), handlers(MemoryUnitOfWork(), MemoryPersonalData()))
    try:
        result = run(ctx, "other-customer-account", addresses={**Target.running_stack(ctx).addresses,
                                                               "accounts": f"localhost:{server.port}"})
    finally:
        server.stop()
    if handlers is AccountsHandlers:
        assert result.outcome is Outcome.HELD, result
        return
    [got_through] = attack_got_through(result)
    assert got_through.startswith("bob: accounts.GetAccount on alice's account: OK: bob read it: owner alice")


class SignatureNotChecked(EnvelopeVerifier):
    """The signature control switched off: parses and trusts whatever arrives."""

    def verify(self, raw: bytes, topic: str, broker_time: Any = None, check_freshness: bool = True) -> VerifiedEvent:
        envelope = parse_envelope(raw, self.max_bytes)
        payload = SCHEMAS[envelope.event_type].message()
        payload.ParseFromString(envelope.payload)
        return VerifiedEvent(envelope, payload)


@pytest.fixture()
def own_route(ctx: StackContext) -> Iterator[tuple[str, str]]:
    """A topic of the test's own with its dead-letter topic: accounts writes, notifications verifies."""
    topic, group = f"lab-it.{uuid.uuid4().hex[:12]}.v1", f"lab-it-{uuid.uuid4().hex[:12]}"
    access = EventAccessPolicy({
        topic: TopicPolicy(topic, 1, ("accounts",), {"notifications": group},
                           {"message.timestamp.type": "LogAppendTime"}),
        f"{topic}.dlq": TopicPolicy(f"{topic}.dlq", 1, ("notifications",), {}),
    })
    admin = Kafka(ctx).admin()
    admin.ensure_topics(access)
    admin.grant(access.grants())
    yield topic, group
    admin.revoke(access.grants())
    admin.client.delete_topics([topic, f"{topic}.dlq"])


@contextmanager
def consumer_on(ctx: StackContext, own_route: tuple[str, str], verifier: EnvelopeVerifier,
                kind: type[VerifyingConsumer] = VerifyingConsumer) -> Iterator[dict[str, Any]]:
    """A verifying consumer (of KIND) of notifications on the test's own topic, judging with VERIFIER; yields the
    event routes of the running stack with accounts' events sent to that topic instead."""
    topic, group = own_route
    engine = create_engine(Postgres(ctx).sqlalchemy_url("notifications", ctx.credentials.postgres["notifications"],
                                                        "notifications"))
    EVENTS_METADATA.create_all(engine)
    consumer = kind(
        ConsumerSettings("notifications", group, [topic], poll_seconds=0.2),
        Kafka(ctx).client_config("notifications", ctx.credentials.kafka["notifications"]),
        verifier, engine, lambda conn, event: None)
    stop = threading.Event()
    worker = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    worker.start()
    try:
        yield {**Target.running_stack(ctx).event_routes, "accounts.events.v1": EventRoute(topic, ("notifications",))}
    finally:
        stop.set()
        worker.join(10)
        consumer.close()
        engine.dispose()


def deposits_on(topic: str) -> TrustPolicy:
    return TrustPolicy({topic: {"accounts": frozenset({"bastion.accounts.v1.MoneyDeposited"})}})


@pytest.mark.parametrize("verifier", [EnvelopeVerifier, SignatureNotChecked], ids=["intact", "signature-not-checked"])
def test_the_tampering_lab_fails_against_a_verifier_that_skips_signatures(
    stack: Any, ctx: StackContext, own_route: tuple[str, str], verifier: type[EnvelopeVerifier],
) -> None:
    trust = KeyRing(ctx.layout.event_keys_dir).trust_store()
    with consumer_on(ctx, own_route, verifier(trust, deposits_on(own_route[0]))) as routes:
        result = run(ctx, "tampered-event", event_routes=routes, service_logs={}, verdict_wait_seconds=15)
    if verifier is EnvelopeVerifier:
        assert result.outcome is Outcome.HELD, result
        return
    assert attack_got_through(result) == ["verdict of notifications: no dead letter within 15s: the event was not "
                                          "refused"]


@pytest.mark.parametrize("follows", [True, False], ids=["follows-the-key-ring", "keeps-its-first-trust-store"])
def test_the_leaked_key_lab_fails_against_a_consumer_that_never_reads_the_key_ring_again(
    stack: Any, ctx: StackContext, own_route: tuple[str, str], follows: bool,
) -> None:
    ring = KeyRing(ctx.layout.event_keys_dir)
    trust = ring.followed_trust_store() if follows else ring.trust_store()
    with consumer_on(ctx, own_route, EnvelopeVerifier(trust, deposits_on(own_route[0]))) as routes:
        result = run(ctx, "leaked-signing-key", event_routes=routes, service_logs={}, verdict_wait_seconds=15)
    if follows:
        assert result.outcome is Outcome.HELD, result
        return
    assert attack_got_through(result) == ["verdict of notifications: no dead letter within 15s: the event was not "
                                          "refused"]


class AppliesAsItComes(VerifyingConsumer):
    """The ordering control switched off: each new event applied as it arrives, whatever its sequence (only an
    event id seen before is dropped)."""

    def _apply_in_order(self, conn: Connection, message: Any, event: VerifiedEvent, item: int | None) -> str:
        if conn.execute(select(inbox.c.event_id).where(inbox.c.event_id == event.envelope.event_id)).first():
            return "duplicate"
        self._apply(conn, event)
        return "applied"


@pytest.mark.parametrize("kind", [VerifyingConsumer, AppliesAsItComes], ids=["intact", "applies-as-it-comes"])
def test_the_ordering_lab_fails_against_a_consumer_that_applies_events_as_they_come(
    stack: Any, ctx: StackContext, own_route: tuple[str, str], kind: type[VerifyingConsumer],
) -> None:
    trust = KeyRing(ctx.layout.event_keys_dir).trust_store()
    with consumer_on(ctx, own_route, EnvelopeVerifier(trust, deposits_on(own_route[0])), kind) as routes:
        result = run(ctx, "reordered-events", event_routes=routes, service_logs={}, verdict_wait_seconds=15)
    if kind is VerifyingConsumer:
        assert result.outcome is Outcome.HELD, result
        return
    assert attack_got_through(result) == [
        "notifications holds event 2 back: inbox holds sequences [2], last applied sequence 2, 0 held",
        "notifications applies 1, then 2, once each: inbox holds sequences [1, 2], last applied sequence 1, 0 held"]


def test_the_log_check_notices_a_forged_line_or_a_raw_escape() -> None:
    """What `forged-log-line` reads in each service's log: the attack getting through in any of its forms is
    evidence against the defence; escaped text is not."""
    marker = "forged0123456789ab"
    assert untouched_since("accounts", '{"event":"call_refused","x":"\\u001b[2J"}\n', marker).held is True
    for written in (f'{{"event":"call_refused"}}\n{{"event":"call_allowed","note":"{marker}"}}\n',
                    '2026-11-27 [warning] event_rejected claimed=\x1b[2J\n',
                    '{"event":"event_rejected","claimed":"\u202egnp.exe"}\n',
                    '{"event":"event_rejected","claimed":"ok\rERROR"}\n'):
        assert untouched_since("accounts", written, marker).held is False, repr(written)


def test_the_personal_data_check_notices_an_address_in_clear() -> None:
    """What `insider-reads-personal-data` reads from the topic and the databases: the address in any of the forms
    a careless store would keep it in is evidence against the defence; ciphertext is not."""
    secret = b"bob.0123456789@example.com"
    assert in_clear_or_sealed("x", b"\x12\x2a" + bytes(range(40)), secret, "sealed").held is True
    for leaked in (b"...owner_email: " + secret + b"...", b"BOB.0123456789@EXAMPLE.COM", secret.hex().encode(),
                   secret.decode().encode("utf-16-le")):
        assert in_clear_or_sealed("x", leaked, secret, "sealed").held is False, leaked


def test_the_audit_key_verdict_notices_a_verifier_that_still_believes_the_leaked_key(tmp_path: Path) -> None:
    """What `leaked-audit-key` reads from the verifier: with the leaked key retired, each forgery is refused or set
    aside (right after the new key's checkpoint with a genuine one after it, before it, and in order among the
    leaked key's own); a verifier that never heard of the retirement believes the last one."""
    ring = KeyRing(tmp_path / "keys")
    ring.ensure(["audit"])
    leaked = ring.signing_key("audit")
    path = tmp_path / "checkpoints.jsonl"
    old = sign_checkpoint(leaked, ORIGIN, Head(5, b"\x05" * 32))
    ring.rotate("audit")
    anchor = sign_checkpoint(ring.signing_key("audit"), ORIGIN, Head(5, b"\x05" * 32))
    later = sign_checkpoint(ring.signing_key("audit"), ORIGIN, Head(8, b"\x08" * 32))
    genuine = "".join(c.to_json() + "\n" for c in (old, anchor, later))
    path.write_text(genuine)
    never_told = ring.trust_store()  # the leaked key still verify-only
    ring.retire("audit", leaked.key_id)
    forged = sign_checkpoint(leaked, ORIGIN, Head(6, b"\x06" * 32))
    assert verdict_on_copy(path, ring.trust_store(), "after", forged, anchor, after=True).held is True
    assert verdict_on_copy(path, ring.trust_store(), "before", forged, anchor).held is True
    in_order = sign_checkpoint(leaked, ORIGIN, Head(4, b"\x04" * 32))
    assert verdict_on_copy(path, ring.trust_store(), "in order", in_order, old).held is True
    assert verdict_on_copy(path, never_told, "in order", in_order, old).held is False
    assert path.read_text() == genuine, "only a scratch copy is forged"


def test_the_download_lab_fails_when_the_pins_are_not_checked(
    stack: Any, ctx: StackContext, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(distributions, "verify", lambda dist, folder: None)
    got_through = attack_got_through(run(ctx, "tampered-download"))
    assert got_through == ["set-up's check of the tampered copy: accepted: Kafka would start from it",
                           "set-up's check of the copy with an extra jar: accepted: Kafka would start from it"]


def test_the_package_lab_fails_when_the_install_does_not_check_hashes(
    stack: Any, ctx: StackContext, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    """An install that drops the lock's hashes (as `pip install -r` of a plain requirements file would) takes the
    backdoored wheel, and importing it runs the attacker's code: the lab must say so."""
    weakened = tmp_path / "install-without-hashes.sh"
    weakened.write_text('sed "s/ --hash=[^ ]*//g" "$2" > "$2.plain"\n'
                        '"$1/bin/pip" install --quiet --no-deps -r "$2.plain"\n')
    monkeypatch.setattr(python_lock, "INSTALL_SCRIPT", weakened)
    got_through = attack_got_through(run(ctx, "tampered-package"))
    assert got_through == ["the install with requirements.lock's entry for tenacity: accepted: the backdoored "
                           "tenacity installed; importing it ran the attacker's code"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("name", ["no-client-certificate", "forged-token"])
def test_a_refusal_that_could_be_an_outage_is_never_taken_for_the_defence(
    stack: Any, ctx: StackContext, name: str,
) -> None:
    """Nothing listens where accounts should be: UNAVAILABLE is what the no-certificate lab expects, yet the lab
    must not hold; its calibration call finds the outage and the lab does not run (exit 2)."""
    result = run(ctx, name, addresses={**Target.running_stack(ctx).addresses, "accounts": f"localhost:{free_port()}"})
    assert result.outcome is Outcome.NOT_RUN
    assert "UNAVAILABLE" in (result.error or "")
