"""Token labs: forged access tokens, genuine tokens presented to a service they were not issued for, a token that
outlives the session it was issued in, one that outlives the role it carries, and a revocation forged with a stolen
service key."""

import hashlib
import hmac
import json
import ssl
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import grpc
import jwt
from confluent_kafka import KafkaError
from cryptography.hazmat.primitives import serialization
from jwt.utils import base64url_decode, base64url_encode
from keycloak import KeycloakAdmin

from bastion.access.v1.decision_pb2 import AccessRevoked
from bastion.accounts.v1 import accounts_pb2, accounts_pb2_grpc
from bastion.devstack.components.keycloak import Keycloak
from bastion.devstack.event_access import load_policy
from bastion.events.envelopes import seal
from bastion.events.errors import RejectReason
from bastion.grpc.channels import call_metadata
from bastion.grpc.tokens import AuthReason, jwks_url, signing_keys
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
from bastion.notifications.v1 import notifications_pb2, notifications_pb2_grpc
from bastion.payments.v1 import payments_pb2
from bastion.revocations.feed import TOPIC as REVOCATIONS_TOPIC

UNAUTHENTICATED = "UNAUTHENTICATED"
WRONG_AUDIENCE = str(AuthReason.WRONG_AUDIENCE)  # named in the refusal's message ("invalid token: wrong_audience: ...")


def _segment(value: dict[str, Any]) -> str:
    return base64url_encode(json.dumps(value, separators=(",", ":")).encode()).decode()


def _realm_public_pem(session: Session, kid: str) -> bytes:
    """The realm's public key KID as a PEM, read from the JWKS endpoint as anybody can."""
    context = ssl.create_default_context(cafile=str(session.ctx.ca_file))
    with urllib.request.urlopen(jwks_url(Keycloak(session.ctx).issuer), context=context, timeout=10) as response:  # noqa: S310 - https to the dev realm
        keys = signing_keys(json.load(response))
    if kid not in keys:
        raise LabSetupError(f"the realm's JWKS has no key {kid}")
    public: Any = keys[kid].key
    pem: bytes = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem


def forgeries(session: Session, genuine: str) -> dict[str, str]:
    """Alice's genuine token with her roles raised to support (who sees every account), re-signed three ways an
    attacker can without the realm's private key."""
    header_text, payload_text, signature = genuine.split(".")
    header = json.loads(base64url_decode(header_text))
    claims = json.loads(base64url_decode(payload_text))
    claims["realm_access"] = {"roles": ["customer", "support"]}
    unsigned = f"{_segment({'alg': 'none', 'typ': 'JWT', 'kid': header['kid']})}.{_segment(claims)}"
    confused_input = f"{_segment({'alg': 'HS256', 'typ': 'JWT', 'kid': header['kid']})}.{_segment(claims)}"
    mac = hmac.new(_realm_public_pem(session, header["kid"]), confused_input.encode(), hashlib.sha256).digest()
    return {
        "alg none, roles raised to support": f"{unsigned}.",
        "HS256 keyed with the realm's public key (key confusion)": f"{confused_input}.{base64url_encode(mac).decode()}",
        "payload edited, RS256 signature kept": f"{header_text}.{_segment(claims)}.{signature}",
    }


def _refusal(what: str, result: Answer, expected: str, accepted: str, reason: str = "") -> Evidence:
    """Held when RESULT is a refusal with the EXPECTED code and, if REASON is given, that reason (the control the lab
    is about fired, not another one)."""
    if result.ok:
        return Evidence(what, f"OK: {accepted}", False)
    if result.code.name != expected:
        return Evidence(what, f"{result} (expected {expected})", False)
    if reason and reason not in result.details:
        return Evidence(what, f"{result} (expected the reason {reason}: another check refused it)", False)
    return Evidence(what, str(result), True)


def _context(watch: Watch, service: str, correlation_id: str) -> Iterator[Evidence]:
    """The refusal's log line and audit record, found by the call's correlation id."""
    for line in watch.log_lines(service, "call_refused", correlation_id)[:1]:
        yield Evidence(f"{service}.log", line)
    for entry in watch.audit_entries(correlation_id)[:1]:
        yield Evidence("audit trail", str(entry))


def _list_accounts(stub: Any, metadata: tuple[tuple[str, str], ...]) -> Answer:
    return answer(lambda: stub.ListAccounts(accounts_pb2.ListAccountsRequest(), metadata=metadata, timeout=TIMEOUT))


def _list_payments(stub: Any, metadata: tuple[tuple[str, str], ...]) -> Answer:
    return answer(lambda: stub.ListPayments(payments_pb2.ListPaymentsRequest(), metadata=metadata, timeout=TIMEOUT))


def forged_token(session: Session) -> Iterator[Evidence]:
    accounts = accounts_pb2_grpc.AccountsStub(session.channel("accounts"))  # type: ignore[no-untyped-call]
    genuine = session.user_token("alice")
    calibration = _list_accounts(accounts, call_metadata(genuine, new_correlation_id("forged-token")))
    if not calibration.ok:
        raise LabSetupError(f"accounts refused alice's genuine token ({calibration}): is the stack healthy?")
    yield Evidence("alice's genuine token, accounts.ListAccounts (calibration)",
                   f"OK: {len(calibration.reply.accounts)} account(s), her own")
    watch = session.watch()
    correlation_id = ""
    for name, token in forgeries(session, genuine).items():
        correlation_id = new_correlation_id("forged-token")
        result = _list_accounts(accounts, call_metadata(token, correlation_id))
        seen = len(result.reply.accounts) if result.ok else 0
        yield _refusal(name, result, UNAUTHENTICATED, f"accepted: alice, now support, lists {seen} accounts")
    yield from _context(watch, "accounts", correlation_id)


def _list_notifications(stub: Any, metadata: tuple[tuple[str, str], ...]) -> Answer:
    return answer(lambda: stub.ListNotifications(notifications_pb2.ListNotificationsRequest(limit=1),
                                                 metadata=metadata, timeout=TIMEOUT))


def _audience(token: str) -> str:
    audience = jwt.decode(token, options={"verify_signature": False}).get("aud")
    return f"aud {audience}" if audience else "no aud claim"


def foreign_audience(session: Session) -> Iterator[Evidence]:
    as_cli = notifications_pb2_grpc.NotificationsStub(session.channel("notifications"))  # type: ignore[no-untyped-call]
    calibration = _list_notifications(as_cli, session.as_user("alice", new_correlation_id("foreign-audience")))
    if not calibration.ok:
        raise LabSetupError(f"notifications refused alice's genuine token ({calibration}): is the stack healthy?")
    yield Evidence("alice's token (its aud names every service), notifications.ListNotifications (calibration)",
                   "OK")
    watch = session.watch()
    stolen = session.service_token("payments")
    as_payments = notifications_pb2_grpc.NotificationsStub(  # type: ignore[no-untyped-call]
        session.channel("notifications", "payments"))
    cid = new_correlation_id("foreign-audience")
    yield _refusal(f"payments' genuine service token ({_audience(stolen)}) at notifications.ListNotifications",
                   _list_notifications(as_payments, call_metadata(stolen, cid)), UNAUTHENTICATED,
                   "notifications accepted a token issued for another service", reason=WRONG_AUDIENCE)
    yield from _context(watch, "notifications", cid)
    nameless = session.service_token("notifications")
    as_notifications = accounts_pb2_grpc.AccountsStub(  # type: ignore[no-untyped-call]
        session.channel("accounts", "notifications"))
    cid = new_correlation_id("foreign-audience")
    yield _refusal(f"notifications' genuine service token ({_audience(nameless)}) at accounts.ListAccounts",
                   _list_accounts(as_notifications, call_metadata(nameless, cid)), UNAUTHENTICATED,
                   "accounts accepted a token that names no audience", reason=WRONG_AUDIENCE)
    yield from _context(watch, "accounts", cid)


STEP_UP_AMOUNT = 150_000  # above payments' step-up threshold (1,000.00 EUR): the session is checked online
SMALL_AMOUNT = 1_000


def revoked_session(session: Session) -> Iterator[Evidence]:
    bank = Bank(session, "revoked-session")
    source, target = bank.open_account("alice", 2 * STEP_UP_AMOUNT), bank.open_account("bob")
    signed_in = session.user_tokens("alice")  # a session of its own, so that ending it touches no other lab
    metadata = call_metadata(str(signed_in["access_token"]), new_correlation_id("revoked-session"))

    def send(amount: int) -> Answer:
        request = bank.transfer_request(source, target, amount)
        return answer(lambda: bank.payments.Transfer(request, metadata=metadata, timeout=TIMEOUT))

    before = send(STEP_UP_AMOUNT)
    if not before.ok:
        raise LabSetupError(f"alice's large transfer with an active session was refused ({before})")
    yield Evidence(f"alice sends {euros(STEP_UP_AMOUNT)} while signed in (calibration)",
                   f"{before.reply.payment.status}: the session was checked online and is active")
    session.sign_out(str(signed_in["refresh_token"]))
    signed_out = time.monotonic()
    yield Evidence("alice signs out (or an admin ends her session)",
                   "her access token is unexpired and still passes local validation")
    after = send(STEP_UP_AMOUNT)
    # At once: payments asks Keycloak whether the session is active (introspection). Should the revocation of the
    # session have reached payments first, the token is refused before: either way, the session's end holds.
    yield Evidence(f"the same token, {euros(STEP_UP_AMOUNT)} again, at once", "OK: the transfer went through"
                   if after.ok else str(after), _session_refusal(after, grpc.StatusCode.PERMISSION_DENIED))
    # Within seconds: the audit service publishes the sign-out (a Keycloak user event) as the session's revocation,
    # and every service refuses the session's tokens, for any amount. Waited for at payments, where the small
    # transfer goes: each service reads the revocations on its own, so another one refusing says nothing of payments.
    ended = _list_payments(bank.payments, metadata)
    while ended.ok and time.monotonic() - signed_out < REVOKED_WITHIN:
        time.sleep(0.25)
        ended = _list_payments(bank.payments, metadata)
    small = send(SMALL_AMOUNT)
    yield Evidence(f"the same token, {euros(SMALL_AMOUNT)} ({time.monotonic() - signed_out:.1f} s after signing "
                   "out)", "OK: the transfer went through" if small.ok else str(small),
                   _session_refusal(small, grpc.StatusCode.UNAUTHENTICATED))
    balance = bank.balance(source)
    moved = STEP_UP_AMOUNT + (STEP_UP_AMOUNT if after.ok else 0) + (SMALL_AMOUNT if small.ok else 0)
    yield Evidence("alice's balance", euros(balance), balance == 2 * STEP_UP_AMOUNT - moved)


SESSION_ENDED = "the session this token was issued in has ended"  # the revocation's refusal (bastion/revocations)


def _session_refusal(result: Answer, code: grpc.StatusCode) -> bool:
    """Whether RESULT is the end of the session refusing: introspection's PERMISSION_DENIED ("active session") when
    CODE says so, or the session's revocation (UNAUTHENTICATED) in any case. Another refusal is not."""
    if result.ok:
        return False
    if result.code == grpc.StatusCode.UNAUTHENTICATED:
        return SESSION_ENDED in result.details
    return code == grpc.StatusCode.PERMISSION_DENIED == result.code and "active session" in result.details


REVOKED = str(AuthReason.REVOKED)  # named in the refusal's message ("invalid token: revoked: ...")
REVOKED_WITHIN = 15.0  # the audit service polls Keycloak every second; the services read as it publishes
REVOCATION_APPLIED_WITHIN = 3.0  # a revocation on the topic ends its tokens about a second after it was written
NOT_AUTHORISED = str(RejectReason.NOT_AUTHORISED)


@contextmanager
def _throwaway_customer(session: Session) -> Iterator[tuple[Any, str, str, str]]:
    """A customer made in the realm for this lab alone (so that revoking it touches no demo user's tokens), as the
    Keycloak admin; removed afterwards. Yields the admin client, the user's id, name and password."""
    try:
        keycloak = Keycloak(session.ctx)
        admin = KeycloakAdmin(server_url=keycloak.server_url, username="admin",
                              password=session.ctx.credentials.keycloak_admin["admin"],
                              realm_name=keycloak.realm_name, user_realm_name="master",
                              verify=str(session.ctx.ca_file))
        username, password = f"lab-{uuid.uuid4().hex[:10]}", f"Lab-{uuid.uuid4().hex}"
        user_id = admin.create_user({
            "username": username, "enabled": True, "email": f"{username}@bastion.local", "emailVerified": True,
            "firstName": "Lab", "lastName": "Customer",
            "credentials": [{"type": "password", "value": password, "temporary": False}]})
        admin.assign_realm_roles(user_id, [admin.get_realm_role("customer")])
    except Exception as error:
        raise LabSetupError(f"Keycloak's admin could not make a customer for the lab: {type(error).__name__}") \
            from error
    try:
        yield admin, user_id, username, password
    finally:
        # The verdict stands either way; a user Keycloak kept is named lab-..., its password known to nobody.
        with suppress(Exception):
            admin.delete_user(user_id)


def _signed_in(session: Session, accounts: Any, username: str, password: str,
               correlation_id: str) -> tuple[tuple[str, str], ...]:
    """The call metadata of the lab's customer, signed in, with a genuine token accounts has accepted once."""
    try:
        token = str(session.keycloak("bastion-cli").token(username, password)["access_token"])
    except Exception as error:
        raise LabSetupError(f"the lab's customer could not sign in: {type(error).__name__}") from error
    metadata = call_metadata(token, correlation_id)
    calibration = _list_accounts(accounts, metadata)
    if not calibration.ok:
        raise LabSetupError(f"accounts refused a new customer's genuine token ({calibration}): is the stack "
                            "healthy?")
    return metadata


def removed_role(session: Session) -> Iterator[Evidence]:
    accounts = accounts_pb2_grpc.AccountsStub(session.channel("accounts"))  # type: ignore[no-untyped-call]
    with _throwaway_customer(session) as (admin, user_id, username, password):
        correlation_id = new_correlation_id("removed-role")
        metadata = _signed_in(session, accounts, username, password, correlation_id)
        yield Evidence(f"{username}, a customer, signs in; accounts.ListAccounts (calibration)", "OK")
        time.sleep(1.1)  # `iat` counts whole seconds: the change falls in a later second than the sign-in
        try:
            admin.delete_realm_roles_of_user(user_id, [admin.get_realm_role("customer")])
        except Exception as error:
            raise LabSetupError(f"Keycloak's admin could not take the role away: {type(error).__name__}") from error
        taken = time.monotonic()
        yield Evidence("an administrator takes the customer role away in Keycloak",
                       "the access token is unexpired and its signature still verifies: it still says customer")
        watch = session.watch()
        result = _list_accounts(accounts, metadata)
        while result.ok and time.monotonic() - taken < REVOKED_WITHIN:
            time.sleep(0.25)
            result = _list_accounts(accounts, metadata)
        waited = time.monotonic() - taken
        yield _refusal(f"the same token, accounts.ListAccounts ({waited:.1f} s after the change)", result,
                       UNAUTHENTICATED, f"accepted for {REVOKED_WITHIN:g} s: the removed role still counts",
                       reason=REVOKED)
        yield from _context(watch, "accounts", correlation_id)


def forged_revocation(session: Session) -> Iterator[Evidence]:
    """A thief of payments' signing key revokes a customer's access (a denial of service that would need no
    password): first through payments' own Kafka credentials, then past the ACLs as the broker's admin."""
    accounts = accounts_pb2_grpc.AccountsStub(session.channel("accounts"))  # type: ignore[no-untyped-call]
    access = load_policy(session.ctx.settings.infra_dir / "event-access.yaml", set(session.ctx.service_names))
    readers = sorted(access.topics[REVOCATIONS_TOPIC].witnesses)
    with _throwaway_customer(session) as (_, user_id, username, password):
        correlation_id = new_correlation_id("forged-revocation")
        metadata = _signed_in(session, accounts, username, password, correlation_id)
        yield Evidence(f"{username}, a customer, signs in; accounts.ListAccounts (calibration)", "OK")
        forged = AccessRevoked(subject=user_id, cause="USER DELETE", keycloak_event_id=correlation_id)
        forged.revoked_at.GetCurrentTime()
        key = session.signing_key("payments")
        record = seal(key, REVOCATIONS_TOPIC, forged, aggregate_id=user_id, sequence=1,
                      correlation_id=correlation_id).SerializeToString()
        yield Evidence("the forged revocation", f"AccessRevoked of {username}'s tokens, validly signed with payments' "
                                                f"key {key.key_id[:12]}…, for {REVOCATIONS_TOPIC}")
        own = session.publish("payments", REVOCATIONS_TOPIC, record, key=user_id.encode())
        if own.error is None:
            yield Evidence("as Kafka principal payments", f"written at {own.source}: payments may write revocations",
                           False)
        elif own.error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
            yield Evidence("as Kafka principal payments", f"refused by the broker: {own.error.name()} (only the "
                                                          "audit principal may write the topic)", True)
        else:  # an outage is no defence
            raise LabSetupError(f"Kafka could not be asked to take the record as payments: {own.error.str()}")
        watch = session.watch()
        past = session.publish("admin", REVOCATIONS_TOPIC, record, key=user_id.encode())
        if past.error is not None:
            raise LabSetupError(f"the broker's admin could not write to {REVOCATIONS_TOPIC}: {past.error.str()}")
        yield Evidence("past the ACLs, as the broker's admin", f"written at {past.source}")
        for reader in readers:
            lines = watch.log_lines(reader, "revocation_refused", correlation_id)
            if not lines:
                yield Evidence(f"{reader}.log", "no refusal logged: the revocation was taken", False)
            else:
                yield Evidence(f"{reader}.log", lines[0], NOT_AUTHORISED in lines[0])
        time.sleep(REVOCATION_APPLIED_WITHIN)  # a revocation taken would end the token by now
        result = _list_accounts(accounts, metadata)
        if result.ok:
            yield Evidence(f"{username}'s token, accounts.ListAccounts", "OK: the forged revocation ended nothing",
                           True)
        elif REVOKED in result.details:
            yield Evidence(f"{username}'s token, accounts.ListAccounts", f"{result}: the forgery revoked access",
                           False)
        else:
            raise LabSetupError(f"accounts refused the customer's token for another reason ({result})")
        for entry in watch.audit_entries(correlation_id, count=len(readers), kind="rejection"):
            yield Evidence("audit trail", str(entry))
