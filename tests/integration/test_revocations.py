"""Token revocation through the running platform (bastion/revocations): a change in Keycloak that takes a user's
access away, or a sign-out, ends the tokens it concerns in every service within seconds, not when they expire.

Each test makes a user of its own in the realm (as the Keycloak admin), so that revoking it touches no token of the
demo users other tests hold."""

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from keycloak import KeycloakAdmin, KeycloakOpenID
from keycloak.exceptions import KeycloakPostError

from bastion.access.v1.decision_pb2 import AccessRevoked
from bastion.accounts.v1 import accounts_pb2
from bastion.devstack.context import StackContext
from bastion.devstack.process import ProcessSupervisor
from bastion.grpc.channels import call_metadata
from bastion.notifications.v1 import notifications_pb2
from bastion.payments.v1 import payments_pb2
from bastion.revocations.feed import TOPIC
from bastion.revocations.revoked import COMMIT_MARGIN_SECONDS
from bastion.runtime import REVOCATIONS_WATCH_SILENCE_SECONDS
from tests.integration.bank import Bank, health_of, signed_events, wait_for_health
from tests.integration.conftest import bastion

REVOKED_WITHIN = 15.0  # the watch polls every second, the feeds read as it publishes


@dataclass
class Member:
    user_id: str
    username: str
    password: str


@pytest.fixture(scope="module")
def bank(stack: Any, ctx: StackContext) -> Bank:
    return Bank.connect(ctx)


@pytest.fixture(scope="module")
def admin(ctx: StackContext) -> KeycloakAdmin:
    return KeycloakAdmin(server_url=f"https://localhost:{ctx.settings.keycloak_port}/", username="admin",
                         password=ctx.credentials.keycloak_admin["admin"], realm_name="bastion",
                         user_realm_name="master", verify=str(ctx.ca_file))


@pytest.fixture()
def member(admin: KeycloakAdmin) -> Iterator[Member]:
    """A customer of the realm made for one test, and removed after it."""
    username, password = f"it-{uuid.uuid4().hex[:10]}", f"Pw-{uuid.uuid4().hex}"
    user_id = admin.create_user({
        "username": username, "enabled": True, "email": f"{username}@bastion.local", "emailVerified": True,
        "firstName": "It", "lastName": "Member",
        "credentials": [{"type": "password", "value": password, "temporary": False}]})
    admin.assign_realm_roles(user_id, [admin.get_realm_role("customer")])
    yield Member(user_id, username, password)
    admin.delete_user(user_id)


def keycloak(ctx: StackContext) -> KeycloakOpenID:
    return KeycloakOpenID(server_url=f"https://localhost:{ctx.settings.keycloak_port}/", realm_name="bastion",
                          client_id="bastion-cli", verify=str(ctx.ca_file))


def sign_in(ctx: StackContext, member: Member) -> str:
    return str(keycloak(ctx).token(member.username, member.password)["access_token"])


def calls(bank: Bank, token: str) -> dict[str, Any]:
    """One read of each service a customer may call, with TOKEN."""
    metadata = call_metadata(token, f"it-{uuid.uuid4()}")
    return {
        "accounts": lambda: bank.accounts.ListAccounts(accounts_pb2.ListAccountsRequest(), metadata=metadata,
                                                       timeout=10),
        "payments": lambda: bank.payments.ListPayments(payments_pb2.ListPaymentsRequest(), metadata=metadata,
                                                       timeout=10),
        "notifications": lambda: bank.notifications.ListNotifications(
            notifications_pb2.ListNotificationsRequest(), metadata=metadata, timeout=10),
    }


def refusal(call: Any) -> grpc.RpcError | None:
    try:
        call()
    except grpc.RpcError as error:
        return error
    return None


def wait_until_refused(call: Any, within: float = REVOKED_WITHIN) -> grpc.RpcError:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        error = refusal(call)
        if error is not None:
            return error
        time.sleep(0.2)
    raise AssertionError(f"the call was still served {within:g} s after the change")


def test_a_role_taken_away_in_keycloak_ends_the_users_tokens_in_every_service_within_seconds(
        bank: Bank, ctx: StackContext, admin: KeycloakAdmin, member: Member) -> None:
    token = sign_in(ctx, member)
    served = calls(bank, token)
    assert {name: refusal(call) for name, call in served.items()} == dict.fromkeys(served)
    time.sleep(1.1)  # `iat` counts whole seconds: the change must fall in a later second than the sign-in
    admin.delete_realm_roles_of_user(member.user_id, [admin.get_realm_role("customer")])
    for name, call in served.items():
        error = wait_until_refused(call)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (name, error.details())
        assert "access was revoked after this token was issued" in (error.details() or ""), name
    # Signed in again (after the margin the services keep for Keycloak's commit), the user is who Keycloak now says:
    # no customer any more.
    time.sleep(COMMIT_MARGIN_SECONDS + 1.1)
    again = calls(bank, sign_in(ctx, member))
    for name, call in again.items():
        error = refusal(call)
        assert error is not None and error.code() == grpc.StatusCode.PERMISSION_DENIED, name
    # The revocation is a signed event of the audit service on its topic, naming the user and the change.
    revocations = signed_events(ctx, [TOPIC], lambda event: isinstance(event.payload, AccessRevoked)
                                and event.payload.subject == member.user_id, count=1)
    assert revocations and revocations[0].envelope.producer == "audit"
    payload = revocations[0].payload
    assert isinstance(payload, AccessRevoked) and payload.cause == "REALM_ROLE_MAPPING DELETE"


def test_a_user_disabled_in_keycloak_is_refused_while_another_users_tokens_still_count(
        bank: Bank, ctx: StackContext, admin: KeycloakAdmin, member: Member) -> None:
    served = calls(bank, sign_in(ctx, member))["accounts"]
    bystander = calls(bank, bank.token("bob"))["accounts"]
    assert refusal(served) is None
    time.sleep(1.1)
    admin.update_user(member.user_id, {"enabled": False})
    error = wait_until_refused(served)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert refusal(bystander) is None


def test_signing_out_ends_that_sessions_tokens_everywhere_while_another_session_goes_on(
        bank: Bank, ctx: StackContext, member: Member) -> None:
    leaving = keycloak(ctx).token(member.username, member.password)
    staying = calls(bank, sign_in(ctx, member))
    served = calls(bank, str(leaving["access_token"]))
    assert refusal(served["accounts"]) is None
    keycloak(ctx).logout(leaving["refresh_token"])  # the user's own sign-out: a user event, not an admin's change
    for name, call in served.items():
        error = wait_until_refused(call)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (name, error.details())
        assert "the session this token was issued in has ended" in (error.details() or ""), name
    assert {name: refusal(call) for name, call in staying.items()} == dict.fromkeys(staying)


def test_a_refresh_token_used_twice_ends_that_sessions_access_tokens_while_another_session_goes_on(
        bank: Bank, ctx: StackContext, member: Member) -> None:
    """A stolen refresh token: the thief (or the user) refreshes second. Keycloak refuses the reuse and detaches the
    session's client; the access tokens the session already holds, the thief's included, end here too."""
    robbed = keycloak(ctx).token(member.username, member.password)
    staying = calls(bank, sign_in(ctx, member))
    refreshed = keycloak(ctx).refresh_token(robbed["refresh_token"])
    served = {**calls(bank, str(robbed["access_token"])), "refreshed": calls(bank, str(refreshed["access_token"]))[
        "accounts"]}
    assert {name: refusal(call) for name, call in served.items()} == dict.fromkeys(served)
    with pytest.raises(KeycloakPostError, match="refresh token reuse"):
        keycloak(ctx).refresh_token(robbed["refresh_token"])
    for name, call in served.items():
        error = wait_until_refused(call)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (name, error.details())
        assert "the session this token was issued in has ended" in (error.details() or ""), name
    assert {name: refusal(call) for name, call in staying.items()} == dict.fromkeys(staying)


def test_bastion_up_gives_a_realm_of_an_earlier_release_what_revocation_needs(
        bank: Bank, ctx: StackContext, admin: KeycloakAdmin, member: Member) -> None:
    """As an install set up before token revocation: the realm records no events and the audit service may not read
    them (Keycloak's import skips an existing realm). `bastion up` adds what is missing, and revocation works."""
    management, audit = admin.get_client_id("realm-management"), admin.get_client_id("audit")
    account = admin.get_client_service_account_user(audit)
    view_events = admin.get_client_role(management, "view-events")
    # Recording off first, so that what follows is no admin event: taking a client's scope mapping away revokes
    # everyone's tokens (infra/revocation-triggers.yaml), which would end the tokens the other tests hold.
    admin.update_realm("bastion", {"adminEventsEnabled": False, "eventsEnabled": False, "enabledEventTypes": []})
    admin.delete_client_roles_of_user(account["id"], management, [view_events])
    admin.delete_client_roles_of_client_scope(audit, management, [view_events])
    result = bastion("up")
    assert result.returncode == 0, result.stdout + result.stderr
    upgraded = admin.get_realm("bastion")
    assert (upgraded["adminEventsEnabled"], upgraded["eventsEnabled"]) == (True, True)
    assert {"LOGOUT", "REFRESH_TOKEN_ERROR"} <= set(upgraded["enabledEventTypes"])
    assert [role["name"] for role in admin.get_client_roles_of_user(account["id"], management)] == ["view-events"]
    assert [role["name"] for role in admin.get_client_roles_of_client_scope(audit, management)] == ["view-events"]
    leaving = keycloak(ctx).token(member.username, member.password)
    served = calls(bank, str(leaving["access_token"]))["payments"]
    assert refusal(served) is None
    keycloak(ctx).logout(leaving["refresh_token"])
    error = wait_until_refused(served)
    assert "the session this token was issued in has ended" in (error.details() or "")


@pytest.mark.lifecycle
def test_with_the_realms_watch_silent_for_a_minute_every_service_refuses_every_token_until_it_is_back(
        bank: Bank, ctx: StackContext, member: Member) -> None:
    """A watch that stopped must not read as "nothing revoked": with the audit service (the realm's watch) down, the
    other services go on serving through a restart's worth of silence, then refuse every token UNAVAILABLE and say
    NOT_SERVING, until the watch is back."""
    token = sign_in(ctx, member)
    served = calls(bank, token)
    assert {name: refusal(call) for name, call in served.items()} == dict.fromkeys(served)
    assert ProcessSupervisor(ctx.layout).stop("audit")
    stopped = time.monotonic()
    try:
        # Its last word came at most 5 s, and the few seconds of its shutdown, before it stopped: 40 s later the
        # others still serve (the limit is for restarts), and within half a minute more they refuse.
        time.sleep(max(stopped + REVOCATIONS_WATCH_SILENCE_SECONDS - 20 - time.monotonic(), 0))
        assert {name: refusal(call) for name, call in served.items()} == dict.fromkeys(served), "still served"
        refused = {name: wait_until_refused(call, within=30) for name, call in served.items()}
        for name, error in refused.items():
            assert error.code() == grpc.StatusCode.UNAVAILABLE, (name, error.details())
            assert "token revocations unavailable" in (error.details() or ""), name
            assert "the realm's watch (the audit service) was last heard from" in (error.details() or ""), name
        wait_for_health(ctx, "accounts", health_pb2.HealthCheckResponse.NOT_SERVING, timeout=10)
    finally:
        result = bastion("up")  # waits until every service is healthy again
        assert result.returncode == 0, result.stdout + result.stderr
    assert health_of(ctx, "payments") == health_pb2.HealthCheckResponse.SERVING
    assert {name: refusal(call) for name, call in served.items()} == dict.fromkeys(served)
