"""Every RPC of every service of the platform, generated: no one writes a test for a new RPC or a new service.

The services are the ones `infra/services.yaml` declares, each served by `bastion up` on the test stack; their
methods come from the service descriptor named in the service's policy file (`infra/policies/NAME.yaml`), and the
rule of each method from that file. Every RPC is called on the running service, with an empty request (every
refusal comes before a handler reads one), and must be refused:
- without a token, or with a forged one (alg none, an edited payload, a key the realm never had): UNAUTHENTICATED;
- with a real token of a demo user who holds none of the rule's roles: PERMISSION_DENIED;
- without a client certificate: the TLS handshake fails (UNAVAILABLE), and no handler runs.
"""

import importlib
import pkgutil
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

import bastion
from bastion.devstack.catalog import ServiceEntry, load_services
from bastion.devstack.components.service import is_built
from bastion.devstack.context import StackContext
from bastion.devstack.identities import load_identities
from bastion.grpc.channels import call_metadata, channel_credentials
from bastion.grpc.policy import MethodPolicy, load_method_policy
from bastion.settings import PROJECT_ROOT
from tests.integration.forgeries import code_of, forged_tokens, generic_call
from tests.integration.grpc_harness import tls_of, user_token

INFRA = PROJECT_ROOT / "infra"
FORGERIES = ("alg none", "edited payload", "key the realm never had")


def _load_every_proto_module() -> None:
    """Import every generated `*_pb2` module of the project, so the default descriptor pool knows each service."""
    for module in pkgutil.walk_packages(bastion.__path__, "bastion."):
        if module.name.endswith("_pb2"):
            importlib.import_module(module.name)


def _every_rpc() -> list[tuple[ServiceEntry, MethodPolicy, ServiceDescriptor, MethodDescriptor]]:
    _load_every_proto_module()
    pool = descriptor_pool.Default()
    rpcs = []
    for entry in load_services(INFRA / "services.yaml"):
        # A declared service must be built to be tested: this suite runs against the services `bastion up` starts.
        if not is_built(entry.name):
            raise RuntimeError(f"service {entry.name} is declared in infra/services.yaml but services/{entry.name}/"
                               "server.py does not exist yet (docs/new-service.md)")
        policy = load_method_policy(INFRA / "policies" / f"{entry.name}.yaml")
        try:
            service = pool.FindServiceByName(policy.service)
        except KeyError:
            raise RuntimeError(f"service {entry.name}: no generated code for {policy.service}, the service its "
                               "policy names (run `make protos`)") from None
        rpcs += [(entry, policy, service, method) for method in service.methods]
    return rpcs


EVERY_RPC = _every_rpc()
ROLES_OF = {user.username: set(user.roles) for user in load_identities(INFRA / "keycloak" / "identities.yaml").users}


def _user_without(roles: frozenset[str]) -> str | None:
    """A demo user who holds none of ROLES, if there is one."""
    return next((name for name, held in sorted(ROLES_OF.items()) if not held & roles), None)


@pytest.fixture(scope="module")
def forged(ctx: StackContext) -> dict[str, str]:
    return forged_tokens(ctx)


@pytest.fixture(scope="module")
def channels(ctx: StackContext, stack: Any) -> Iterator[dict[str, grpc.Channel]]:
    """Per service, a channel with the cli's client certificate and one with none (the dev CA trusted)."""
    opened: dict[str, grpc.Channel] = {}
    for entry in {rpc[0].name: rpc[0] for rpc in EVERY_RPC}.values():
        target = ctx.grpc_address(entry.name)
        opened[entry.name] = grpc.secure_channel(target, channel_credentials(tls_of(ctx, "cli")))
        opened[f"{entry.name}/no certificate"] = grpc.secure_channel(
            target, grpc.ssl_channel_credentials(root_certificates=ctx.ca_file.read_bytes()))
    yield opened
    for channel in opened.values():
        channel.close()


def test_every_declared_service_has_rpcs_under_test() -> None:
    """No service of infra/services.yaml drops out of the generated tests below for want of a method."""
    declared = {entry.name for entry in load_services(INFRA / "services.yaml")}
    assert {rpc[0].name for rpc in EVERY_RPC} == declared
    assert len(declared) >= 4


@pytest.mark.parametrize(("entry", "policy", "service", "method"), EVERY_RPC,
                         ids=[f"{rpc[2].name}.{rpc[3].name}" for rpc in EVERY_RPC])
def test_every_rpc_of_every_service_refuses_bad_callers(
    ctx: StackContext, channels: dict[str, grpc.Channel], forged: dict[str, str], entry: ServiceEntry,
    policy: MethodPolicy, service: ServiceDescriptor, method: MethodDescriptor,
) -> None:
    call = generic_call(channels[entry.name], service, method)
    assert code_of(lambda: call(timeout=10)) == grpc.StatusCode.UNAUTHENTICATED, "no token"
    for forgery in FORGERIES:
        metadata = call_metadata(forged[forgery])
        assert code_of(lambda: call(metadata=metadata, timeout=10)) == grpc.StatusCode.UNAUTHENTICATED, forgery  # noqa: B023
    rule = policy.rules[method.name]
    outsider = _user_without(rule.roles)
    if outsider is None:  # every demo user holds a role the rule allows: no one to refuse for lack of one
        assert rule.roles >= set().union(*ROLES_OF.values())
    else:
        token = user_token(ctx, outsider)["access_token"]
        assert code_of(lambda: call(metadata=call_metadata(token), timeout=10)) == \
            grpc.StatusCode.PERMISSION_DENIED, f"{outsider} holds none of {sorted(rule.roles)}"
    without_certificate = generic_call(channels[f"{entry.name}/no certificate"], service, method)
    assert code_of(lambda: without_certificate(timeout=10)) == grpc.StatusCode.UNAVAILABLE, "no client certificate"
