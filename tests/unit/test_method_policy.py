"""Method policies: default deny, the start-up completeness check, roles and service identities."""

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.devstack.errors import DevstackError
from bastion.grpc.context import MAX_METHOD
from bastion.grpc.policy import MAX_REMEMBERED, load_method_policy, parse_method_policy
from bastion.grpc.tokens import Principal
from bastion.probe.v1 import probe_pb2

POLICY = Path(__file__).resolve().parents[2] / "infra" / "policies" / "probe.yaml"
PROBE = probe_pb2.DESCRIPTOR.services_by_name["Probe"]


def user(*roles: str, name: str = "alice") -> Principal:
    return Principal(subject="s", username=name, client_id="bastion-cli", roles=frozenset(roles), token_id="j",
                     expires_at=0)


def service(name: str) -> Principal:
    return Principal(subject="s", username=f"service-account-{name}", client_id=name, roles=frozenset(),
                     token_id="j", expires_at=0)


def test_shipped_policy_covers_every_method() -> None:
    load_method_policy(POLICY).check_complete(PROBE)


def test_a_method_without_a_rule_stops_the_server_from_starting() -> None:
    raw: dict[str, Any] = {"service": PROBE.full_name, "methods": {"Whoami": {"roles": ["customer"]}}}
    with pytest.raises(DevstackError, match="method TellerOnly has no rule"):
        parse_method_policy(raw).check_complete(PROBE)


def test_a_rule_that_allows_nobody_is_refused() -> None:
    with pytest.raises(DevstackError, match="allow nobody"):
        parse_method_policy({"service": PROBE.full_name, "methods": {"Whoami": {}}})


@pytest.mark.parametrize("rule", [{"roles": "teller"}, {"services": "payments"}, {"roles": ["teller", 7]},
                                  {"roles": ["teller"], "services": [""]}, ["teller"]])
def test_a_rule_naming_roles_or_services_other_than_as_a_list_of_names_is_refused(rule: Any) -> None:
    """`roles: admin` without brackets is a string, which would be read letter by letter: the rule would allow
    anybody holding a role `a`, `d`, `m`, `i` or `n`, and nobody holding `admin`, and the server would start."""
    with pytest.raises(DevstackError, match="TellerOnly"):
        parse_method_policy({"service": PROBE.full_name, "methods": {"TellerOnly": rule}})


def test_default_deny_for_unknown_methods_and_services() -> None:
    policy = load_method_policy(POLICY)
    assert not policy.decide("/bastion.probe.v1.Probe/Transfer", user("admin"), "cli").allowed
    assert not policy.decide("/bastion.other.v1.Other/Whoami", user("customer"), "cli").allowed
    assert not policy.decide("/bastion.probe.v1.Probe/Whoami", None, "cli").allowed


@pytest.mark.parametrize("path", ["/bastion.probe.v1.Probe/Whoami/", "//bastion.probe.v1.Probe/Whoami",
                                  "bastion.probe.v1.Probe/Whoami", "/bastion.probe.v1.Probe/Whoami/x",
                                  "/x/bastion.probe.v1.Probe/Whoami"])
def test_only_the_canonical_path_of_a_method_names_it(path: str) -> None:
    """gRPC serves a method at `/SERVICE/METHOD` only: any other spelling reaches the server as an unserved path,
    and an allowed verdict for it would put an ALLOW for a call nobody served into the audit trail."""
    policy = load_method_policy(POLICY)
    assert policy.decide("/bastion.probe.v1.Probe/Whoami", user("customer"), "cli").allowed
    verdict = policy.decide(path, user("customer"), "cli")
    assert not verdict.allowed and "denied by default" in verdict.reason


def test_roles_allow_users_only() -> None:
    policy = load_method_policy(POLICY)
    assert policy.decide("/bastion.probe.v1.Probe/TellerOnly", user("teller", name="tina"), "cli").allowed
    assert not policy.decide("/bastion.probe.v1.Probe/TellerOnly", user("customer"), "cli").allowed
    # A service account holding the role (a mapper misconfigured in the realm) is still no teller.
    account = Principal(subject="s", username="service-account-payments", client_id="payments",
                        roles=frozenset({"teller"}), token_id="j", expires_at=0)
    assert not policy.decide("/bastion.probe.v1.Probe/TellerOnly", account, "payments").allowed


def test_service_rules_need_the_certificate_and_the_token_of_the_same_service() -> None:
    policy = load_method_policy(POLICY)
    method = "/bastion.probe.v1.Probe/PaymentsOnly"
    assert policy.decide(method, service("payments"), "payments").allowed
    assert not policy.decide(method, service("payments"), "notifications").allowed
    assert not policy.decide(method, service("notifications"), "payments").allowed
    assert not policy.decide(method, user("admin"), "payments").allowed


def test_a_service_rule_needs_that_services_own_account_not_any_token_its_client_was_issued() -> None:
    """A service rule names the calling service's certificate and its service-account token: a person's token that
    happens to name the service's client (`azp`), sent over that service's certificate, is no calling service."""
    policy = load_method_policy(POLICY)
    mallory = Principal("s", "mallory", "payments", frozenset({"customer"}), "j", 0)
    assert not policy.decide("/bastion.probe.v1.Probe/PaymentsOnly", mallory, "payments").allowed
    assert policy.decide("/bastion.probe.v1.Probe/PaymentsOnly", service("payments"), "payments").allowed


def test_the_accounts_policy_covers_the_accounts_service() -> None:
    from bastion.accounts.v1 import accounts_pb2

    policy = load_method_policy(POLICY.parent / "accounts.yaml")
    policy.check_complete(accounts_pb2.DESCRIPTOR.services_by_name["Accounts"])
    assert not policy.decide("/bastion.accounts.v1.Accounts/ApplyTransfer", user("customer"), "cli").allowed
    assert not policy.decide("/bastion.accounts.v1.Accounts/Deposit", user("customer"), "cli").allowed
    assert policy.decide("/bastion.accounts.v1.Accounts/ApplyTransfer", service("payments"), "payments").allowed


METHODS = st.sampled_from([f"/{PROBE.full_name}/{m.name}" for m in PROBE.methods]
                          + ["/bastion.probe.v1.Probe/Transfer", "/bastion.other.v1.Other/Whoami"])
# Few principals, so that the same question comes back and look-alikes meet: the same client and roles as a user
# and as a service account, a service's client id with a user's name.
PRINCIPALS = st.sampled_from([
    None, user("customer"), user("teller", name="tina"), user(), service("payments"), service("notifications"),
    Principal("s", "service-account-bastion-cli", "bastion-cli", frozenset({"teller"}), "j", 0),
    Principal("s", "mallory", "payments", frozenset({"customer"}), "j", 0),
])
PEERS = st.sampled_from([None, "cli", "payments", "notifications", "accounts"])


@settings(max_examples=300)
@given(st.lists(st.tuples(METHODS, PRINCIPALS, PEERS), min_size=2, max_size=80))
def test_a_remembered_verdict_is_always_the_rules_verdict(questions: list[tuple[str, Principal | None, str | None]]
                                                          ) -> None:
    policy = load_method_policy(POLICY)
    for method, principal, peer in questions:
        assert policy.decide(method, principal, peer) == policy._decide(method, principal, peer)


def test_look_alike_principals_get_their_own_verdicts() -> None:
    """A service account with a user's client and roles, or a user holding a service's client id, asks another
    question than the user it resembles: a remembered verdict is never handed to the wrong one."""
    policy = load_method_policy(POLICY)
    teller = user("teller", name="tina")
    machine_teller = Principal("s", "service-account-bastion-cli", "bastion-cli", frozenset({"teller"}), "j", 0)
    assert policy.decide("/bastion.probe.v1.Probe/TellerOnly", teller, "cli").allowed
    assert not policy.decide("/bastion.probe.v1.Probe/TellerOnly", machine_teller, "cli").allowed
    assert policy.decide("/bastion.probe.v1.Probe/PaymentsOnly", service("payments"), "payments").allowed
    assert not policy.decide("/bastion.probe.v1.Probe/PaymentsOnly", service("payments"), "notifications").allowed


def test_paths_to_unknown_methods_are_never_remembered_and_cut_in_the_verdict() -> None:
    """A caller's path to an unknown method is its own text: remembering it, or repeating it whole, would let any
    caller fill the server's memory."""
    policy = load_method_policy(POLICY)
    for number in range(100):
        assert not policy.decide(f"/bastion.probe.v1.Probe/Nothing{number}{'x' * 10_000}", user("admin"), "cli").allowed
    assert policy._verdicts == {}
    assert len(policy.decide(f"/x/{'y' * 10_000}", user("admin"), "cli").reason) < MAX_METHOD + 50
    for number in range(MAX_REMEMBERED + 10):  # served methods: at most MAX_REMEMBERED questions are kept
        policy.decide("/bastion.probe.v1.Probe/Whoami", user("customer", name="u"), f"peer-{number}")
    assert 0 < len(policy._verdicts) <= MAX_REMEMBERED


def raw_probe_policy() -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(POLICY.read_text())
    return raw


def test_a_policy_written_for_another_service_stops_the_server_from_starting() -> None:
    raw = raw_probe_policy()
    raw["service"] = "bastion.other.v1.Probe"
    with pytest.raises(DevstackError, match=r"policy is for bastion\.other\.v1\.Probe"):
        parse_method_policy(raw).check_complete(PROBE)


def test_a_rule_for_a_method_the_service_lacks_stops_the_server_from_starting() -> None:
    raw = raw_probe_policy()
    raw["methods"]["Transfer"] = {"roles": ["admin"]}
    with pytest.raises(DevstackError, match="rule for unknown method Transfer"):
        parse_method_policy(raw).check_complete(PROBE)


def test_rules_apply_to_the_exact_service_name_only() -> None:
    """A service of another package with the same short name is another service: default deny."""
    policy = load_method_policy(POLICY)
    for path in ["/bastion.other.v1.Probe/Whoami", "/evil.Probe/Whoami", "/bastion.probe.v1.Probe2/Whoami"]:
        assert not policy.decide(path, user("customer"), "cli").allowed, path


def test_a_service_the_rule_does_not_name_is_denied_even_with_its_own_certificate_and_token() -> None:
    policy = load_method_policy(POLICY)
    method = "/bastion.probe.v1.Probe/PaymentsOnly"
    for name in ["notifications", "accounts", "audit", "cli"]:
        assert not policy.decide(method, service(name), name).allowed, name


def test_a_role_the_rule_does_not_name_allows_nothing_not_even_admin() -> None:
    policy = load_method_policy(POLICY)
    assert not policy.decide("/bastion.probe.v1.Probe/TellerOnly", user("admin"), "cli").allowed
    assert not policy.decide("/bastion.probe.v1.Probe/TellerOnly", user("customer", "support", "auditor", "admin"),
                             "cli").allowed
    assert not policy.decide("/bastion.probe.v1.Probe/Countdown", user("admin"), "cli").allowed
