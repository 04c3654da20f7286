"""The scorecard of `bastion lab run --all`: one line per concern of the security guide (the rows of
docs/security.md, by section), held when every lab that proves it held, "not covered" (with the reason) when no
lab does."""

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from rich.console import Console
from rich.markup import escape

from bastion.labs.base import LabResult, Outcome


@dataclass(frozen=True)
class Concern:
    title: str  # exactly as the row of docs/security.md
    labs: tuple[str, ...] = ()
    not_covered: str = ""  # why no lab proves it


# The sections and rows of docs/security.md, in its order (tests/integration/test_labs.py keeps them in step).
SECTIONS: tuple[tuple[str, tuple[Concern, ...]], ...] = (
    ("Data integrity and consistency", (
        Concern("Event tampering or spoofing", ("tampered-event", "foreign-event-type", "forged-revocation")),
        Concern("Replay attacks", ("replayed-event",)),
        Concern("Out-of-order processing", ("reordered-events",)),
    )),
    ("Authentication and authorization", (
        Concern("Inadequate service-to-service authentication", ("no-client-certificate", "service-impersonation")),
        Concern("Broken access control", ("service-impersonation", "other-customer-account")),
        Concern("Token leakage", ("forged-token", "foreign-audience")),
    )),
    ("Message broker and event bus", (
        Concern("Unauthorized access to message brokers", ("topic-without-acl",)),
        Concern("Lack of encryption in transit for event data", ("plaintext-broker",)),
        Concern("Lack of encryption at rest for event data", ("insider-reads-personal-data",)),
        Concern("Lack of audit trails/logging", ("audit-tampering",)),
    )),
    ("Eventual consistency", (
        Concern("Race conditions", ("double-spend", "paused-lock-holder")),
        Concern("Temporal authorization issues (decisions on outdated state)", ("revoked-session", "removed-role")),
    )),
    ("Service discovery and configuration", (
        Concern("Unsecured service discovery",
                not_covered="there is no discovery service; addresses are static configuration"),
        Concern("Misconfigured service boundaries (unintended exposure)", ("network-exposure",)),
    )),
    ("API gateway and edge", (
        Concern("Single point of failure or compromise at the gateway", not_covered="the platform has no gateway"),
        Concern("Lack of rate limiting", ("rate-limit",)),
        Concern("Improper CORS configuration", not_covered="no HTTP or browser-facing API"),
    )),
    ("CI/CD and supply chain", (
        Concern("Unverified dependencies", ("tampered-download", "tampered-package")),
        Concern("Unverified event schemas", ("unknown-schema",)),
        Concern("Unsecured CI/CD pipelines", not_covered="pipeline hardening is outside this repository"),
    )),
    ("Monitoring, logging and incident response", (
        Concern("Distributed logs lacking correlation",
                not_covered="no lab of its own (it is no attack): every lab prints the log line and audit record "
                            "of its attempts, found by their correlation id, as `bastion trail` does; the labs' "
                            "calls are not sampled, so they leave no spans (the demo's last step shows a trace)"),
        Concern("Lack of anomaly detection", ("permission-probing", "suppressed-event")),
        Concern("Silent failures: event losses or retries without alerting", ("suppressed-event",)),
    )),
    ("Testing and isolation", (
        Concern("Test data leakage", not_covered="synthetic users and a separate test install (conftest.py)"),
        Concern("Insufficient sandboxing",
                not_covered="the test suite runs its own install; the labs work on accounts and ids of their own"),
    )),
    ("Fault tolerance and resilience", (
        Concern("Retry mechanisms as attack vectors (retry storms)", ("retry-storm",)),
        Concern("Fail-open security models", ("retry-storm", "paused-lock-holder", "revoked-session")),
    )),
    ("Checklist items that are not already a row", (
        Concern("TLS for all communications, verified", ("no-client-certificate", "plaintext-broker")),
        Concern("No anonymous super user, no default secrets", ("datastore-access",)),
        Concern("Data access controls (databases)", ("datastore-access", "audit-tampering")),
        Concern("Centralized authentication (Keycloak), short-lived tokens", ("forged-token", "foreign-audience")),
        Concern("Redis traffic encryption", ("datastore-access",)),
        Concern("Input validation and secure error handling", ("hostile-input",)),
        Concern("Secure key management", ("leaked-signing-key", "leaked-audit-key")),
        Concern("Service mesh, WAF", not_covered="no mesh or HTTP edge"),
        Concern("Data backup security", ("stolen-backup",)),
        Concern("Session management", ("revoked-session",)),
        Concern("Output encoding", ("forged-log-line",)),
        Concern("Security updates and patches",
                not_covered="versions are pinned; nothing watches advisories or proposes updates"),
        Concern("Compliance, training, incident response, assessments",
                not_covered="organisational; the labs are the training material (docs/training.md)"),
    )),
)
CONCERNS: tuple[Concern, ...] = tuple(concern for _, concerns in SECTIONS for concern in concerns)


class Status(StrEnum):
    HELD = "held"
    NOT_HELD = "not held"
    NOT_COVERED = "not covered"


def status_of(concern: Concern, results: Mapping[str, LabResult]) -> Status:
    """Held when every lab of CONCERN ran and held; a lab that did not hold, or did not run, fails the concern."""
    if not concern.labs:
        return Status.NOT_COVERED
    held = all(name in results and results[name].outcome is Outcome.HELD for name in concern.labs)
    return Status.HELD if held else Status.NOT_HELD


def print_scorecard(results: Mapping[str, LabResult], console: Console) -> None:
    """One line per concern under its section, never wrapped, so that each can be read (and grepped) alone."""
    colours = {Status.HELD: "green", Status.NOT_HELD: "red", Status.NOT_COVERED: "yellow"}
    console.print("\n[bold]Scorecard[/bold] (the concerns of docs/security.md)")
    for section, concerns in SECTIONS:
        console.print(f"[bold]{escape(section)}[/bold]")
        for concern in concerns:
            status = status_of(concern, results)
            detail = ", ".join(_lab_verdict(name, results) for name in concern.labs) or concern.not_covered
            console.print(f"  [{colours[status]}]{status.value:<11}[/{colours[status]}] {escape(concern.title)}: "
                          f"[dim]{escape(detail)}[/dim]", soft_wrap=True)


def _lab_verdict(name: str, results: Mapping[str, LabResult]) -> str:
    if name not in results:
        return f"{name} (not run)"
    outcome = results[name].outcome
    return name if outcome is Outcome.HELD else f"{name} ({outcome.name.lower().replace('_', ' ')})"


def concerns_of(lab: str) -> list[str]:
    return [concern.title for concern in CONCERNS if lab in concern.labs]
