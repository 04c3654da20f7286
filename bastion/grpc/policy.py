"""Per-method authorisation from a declarative policy file (infra/policies/SERVICE.yaml), default deny."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from google.protobuf.descriptor import ServiceDescriptor

from bastion.devstack.errors import DevstackError
from bastion.grpc.context import MAX_METHOD
from bastion.grpc.tokens import Principal


@dataclass(frozen=True)
class MethodRule:
    roles: frozenset[str]
    services: frozenset[str]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


# Verdicts remembered per distinct question (method, the caller's roles and client, peer): a service sees few.
MAX_REMEMBERED = 4096


@dataclass(frozen=True)
class MethodPolicy:
    service: str
    rules: dict[str, MethodRule]
    # The rules never change, so a verdict depends only on what `_decide` reads: it is worked out once per
    # distinct question and then looked up (the call path's cost, not a security shortcut; cleared when full).
    _verdicts: dict[tuple[str, str, frozenset[str], bool, str | None], Decision] = field(
        default_factory=dict, init=False, repr=False, compare=False)
    _served: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_served", frozenset(f"/{self.service}/{method}" for method in self.rules))

    def check_complete(self, descriptor: ServiceDescriptor) -> None:
        """Refuse to serve a service whose methods are not all covered, or a policy naming others."""
        methods = {method.name for method in descriptor.methods}
        problems = []
        if descriptor.full_name != self.service:
            problems.append(f"policy is for {self.service}, the server serves {descriptor.full_name}")
        problems += [f"method {name} has no rule" for name in sorted(methods - set(self.rules))]
        problems += [f"rule for unknown method {name}" for name in sorted(set(self.rules) - methods)]
        if problems:
            raise DevstackError(f"method policy of {descriptor.full_name}: " + "; ".join(problems),
                                "give every method of the service exactly one rule in its policy file")

    def decide(self, full_method: str, principal: Principal | None, peer_identity: str | None) -> Decision:
        if principal is None or full_method not in self._served:
            # Only questions about served methods are remembered: a path to an unknown method is the caller's text.
            return self._decide(full_method, principal, peer_identity)
        question = (full_method, principal.client_id, principal.roles, principal.is_service_account, peer_identity)
        verdict = self._verdicts.get(question)
        if verdict is None:
            if len(self._verdicts) >= MAX_REMEMBERED:
                self._verdicts.clear()
            verdict = self._verdicts[question] = self._decide(full_method, principal, peer_identity)
        return verdict

    def _decide(self, full_method: str, principal: Principal | None, peer_identity: str | None) -> Decision:
        """The verdict from the rules; reads only the principal's client id, roles and kind. Only the canonical
        path `/SERVICE/METHOD` names a method: `/SERVICE/METHOD/` or `//SERVICE/METHOD` is no method of this
        service (gRPC serves no such path), so it has no rule."""
        parts = full_method.split("/")
        service, method = (parts[1], parts[2]) if len(parts) == 3 and not parts[0] else ("", "")
        rule = self.rules.get(method) if service == self.service else None
        if rule is None:
            return Decision(False, f"no rule for {full_method[:MAX_METHOD]}: denied by default")
        if principal is None:
            return Decision(False, "no authenticated principal")
        # The service's own account, over its own certificate: not any token its client was issued (as the rate
        # limiter's service budget and the services' handlers read a calling service).
        if (rule.services and principal.is_service_account and peer_identity in rule.services
                and principal.client_id == peer_identity):
            return Decision(True, f"service {peer_identity} is allowed")
        if rule.roles and not principal.is_service_account and rule.roles & principal.roles:
            return Decision(True, f"role {sorted(rule.roles & principal.roles)[0]} is allowed")
        wanted = sorted(rule.roles) + [f"service:{s}" for s in sorted(rule.services)]
        return Decision(False, f"{full_method} needs one of {', '.join(wanted)}")


def _names(service: Any, method: str, entry: Any, kind: str) -> frozenset[str]:
    """The roles or services (KIND) a rule names. Only a list of names: a bare string would be read letter by letter
    (`roles: admin` would allow the roles a, d, m, i and n), and the server would start with it."""
    names = (entry.get(kind) or []) if isinstance(entry, dict) else None
    if not isinstance(names, list) or not all(isinstance(name, str) and name for name in names):
        raise DevstackError(f"method policy of {service}: the rule of {method} must give its roles and services as "
                            "lists of names", f"write it as `{method}: {{{kind}: [name, ...]}}`")
    return frozenset(names)


def parse_method_policy(raw: dict[str, Any]) -> MethodPolicy:
    service = raw.get("service")
    rules = {
        name: MethodRule(_names(service, name, entry, "roles"), _names(service, name, entry, "services"))
        for name, entry in (raw.get("methods") or {}).items()
    }
    empty = [name for name, rule in rules.items() if not rule.roles and not rule.services]
    if empty:
        raise DevstackError(f"method policy of {raw.get('service')}: rules allow nobody: {', '.join(empty)}",
                            "name the roles or services allowed, or remove the method")
    return MethodPolicy(str(raw["service"]), rules)


def load_method_policy(path: Path) -> MethodPolicy:
    return parse_method_policy(yaml.safe_load(path.read_text()))
