"""Benchmark of token revocation on the running dev stack: how long a token stays good after Keycloak ends it.

Run with `make bench-revocation` (`.venv/bin/python -m benchmarks.revocation [--rounds R]`; uses the dev install in
.state and starts it if it is not running; it is left running). Each round makes a customer of its own in the realm
(as the Keycloak admin), signs it in twice, then:
  - sign-out: ends one session (the user's own logout, a Keycloak user event) and calls accounts.ListAccounts with
    that session's token every 50 ms until it is refused;
  - role taken away: takes the customer role away (an admin event) and does the same with the other session's token;
and deletes the customer. The time from Keycloak answering the change to the first refusal is the whole way: the
audit service's poll of Keycloak (every second), its signed AccessRevoked on identity.revocations.v1, and the
accounts service reading it. Printed per round, with the median and the worst.
"""

import argparse
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
from keycloak import KeycloakAdmin, KeycloakOpenID

from bastion.accounts.v1 import accounts_pb2, accounts_pb2_grpc
from bastion.devstack.context import StackContext
from bastion.grpc.channels import blocking_channel, call_metadata
from benchmarks.grpc_chain import bastion, stack_context, tls_of

GIVE_UP_SECONDS = 30.0
POLL_SECONDS = 0.05


def _refused_after(call: Callable[[], Any], since: float) -> float:
    """Seconds from SINCE until CALL is refused UNAUTHENTICATED (the revocation); another answer is an error."""
    while time.monotonic() - since < GIVE_UP_SECONDS:
        try:
            call()
        except grpc.RpcError as refused:
            if refused.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise
            return time.monotonic() - since
        time.sleep(POLL_SECONDS)
    raise RuntimeError(f"the token was still accepted {GIVE_UP_SECONDS:g} s after the change")


def _round(ctx: StackContext, admin: KeycloakAdmin, cli: KeycloakOpenID, accounts: Any) -> tuple[float, float]:
    username, password = f"bench-{uuid.uuid4().hex[:10]}", f"Bench-{uuid.uuid4().hex}"
    user_id = admin.create_user({"username": username, "enabled": True, "email": f"{username}@bastion.local",
                                 "emailVerified": True, "firstName": "Bench", "lastName": "Customer",
                                 "credentials": [{"type": "password", "value": password, "temporary": False}]})
    try:
        role = admin.get_realm_role("customer")
        admin.assign_realm_roles(user_id, [role])
        leaving, staying = cli.token(username, password), cli.token(username, password)

        def list_with(tokens: dict[str, Any]) -> Callable[[], Any]:
            metadata = call_metadata(str(tokens["access_token"]), f"bench-revocation-{uuid.uuid4()}")
            return lambda: accounts.ListAccounts(accounts_pb2.ListAccountsRequest(), metadata=metadata, timeout=10)

        signed_out, role_gone = list_with(leaving), list_with(staying)
        signed_out(), role_gone()  # both good before
        time.sleep(3.1)  # past the margin kept for Keycloak's commit: the role change below ends only older tokens
        cli.logout(leaving["refresh_token"])
        logout = _refused_after(signed_out, time.monotonic())
        admin.delete_realm_roles_of_user(user_id, [role])
        removal = _refused_after(role_gone, time.monotonic())
        return logout, removal
    finally:
        admin.delete_user(user_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    bastion("up")
    ctx = stack_context()
    url = f"https://{ctx.settings.public_host}:{ctx.settings.keycloak_port}/"
    admin = KeycloakAdmin(server_url=url, username="admin", password=ctx.credentials.keycloak_admin["admin"],
                          realm_name="bastion", user_realm_name="master", verify=str(ctx.ca_file))
    cli = KeycloakOpenID(server_url=url, realm_name="bastion", client_id="bastion-cli", verify=str(ctx.ca_file))
    channel = blocking_channel(ctx.grpc_address("accounts"), tls_of(ctx, "cli"), "accounts")
    accounts = accounts_pb2_grpc.AccountsStub(channel)  # type: ignore[no-untyped-call]
    logouts, removals = [], []
    print("token revocation on the dev stack: seconds from Keycloak's answer to the change until accounts refuses "
          "the token")
    print(f"  {'round':>5}   {'sign-out':>8}   {'role taken away':>15}")
    for number in range(1, options.rounds + 1):
        logout, removal = _round(ctx, admin, cli, accounts)
        logouts.append(logout)
        removals.append(removal)
        print(f"  {number:>5}   {logout:>8.2f}   {removal:>15.2f}")
    print(f"  {'median':>5}   {statistics.median(logouts):>8.2f}   {statistics.median(removals):>15.2f}")
    print(f"  {'worst':>5}   {max(logouts):>8.2f}   {max(removals):>15.2f}")
    channel.close()


if __name__ == "__main__":
    main()
