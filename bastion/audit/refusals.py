"""`bastion audit refusals` and `bastion audit alerts`: what a security review reads first, the calls an interceptor
denied and the events a consumer refused, and the alerts the audit service raised over them; for `bastion trail`,
every record that carries one correlation id. Asked of the audit service like any client: mutual TLS with the cli
certificate and a token of the realm's auditor (a demo user of this install), through the same method policy as
everyone else."""

import datetime as dt
from collections import deque
from collections.abc import Callable

from keycloak import KeycloakOpenID

from bastion.access.v1.decision_pb2 import SecurityAlert
from bastion.audit.alerts import ALERTING_SERVICE, alert_in
from bastion.audit.records import RecordKind
from bastion.audit.v1 import audit_pb2, audit_pb2_grpc
from bastion.devstack.context import StackContext
from bastion.devstack.errors import DevstackError
from bastion.devstack.identities import Identities, load_identities
from bastion.events.errors import VerificationError
from bastion.grpc.channels import blocking_channel, call_metadata
from bastion.grpc.server import TlsFiles

AUDITOR_ROLE = "auditor"
PAGE = 500


def auditor_of(identities: Identities) -> str:
    """The first demo user who holds the auditor role."""
    auditors = [user.username for user in identities.users if AUDITOR_ROLE in user.roles]
    if not auditors:
        raise DevstackError("no demo user holds the auditor role", "give one in infra/keycloak/identities.yaml")
    return auditors[0]


def recent_refusals(ctx: StackContext, minutes: float, limit: int) -> list[audit_pb2.AuditEvent]:
    """The LIMIT newest refusals recorded in the last MINUTES, oldest first."""
    return _recent(ctx, minutes, limit, audit_pb2.ListEventsRequest(refusals_only=True, page_size=PAGE))


def recent_alerts(ctx: StackContext, minutes: float, limit: int
                  ) -> list[tuple[audit_pb2.AuditEvent, SecurityAlert | str]]:
    """The LIMIT newest security alerts raised in the last MINUTES, oldest first, each with its record; an alert
    that cannot be read back (it verified on its way in: never seen) comes as the reason instead."""
    request = audit_pb2.ListEventsRequest(event_type=SecurityAlert.DESCRIPTOR.full_name, page_size=PAGE)
    return [(event, _read(event)) for event in _recent(ctx, minutes, limit, request, _raised)]


def carrying(ctx: StackContext, correlation_id: str, minutes: float | None, limit: int
             ) -> list[audit_pb2.AuditEvent]:
    """The LIMIT newest records that carry CORRELATION_ID (of the last MINUTES, or of the whole log when None),
    oldest first: the audit service looks them up in its index of correlation ids."""
    return _recent(ctx, minutes, limit, audit_pb2.ListEventsRequest(correlation_id=correlation_id, page_size=PAGE))


def _read(event: audit_pb2.AuditEvent) -> SecurityAlert | str:
    try:
        return alert_in(event.envelope)
    except VerificationError as error:
        return str(error)


def _raised(event: audit_pb2.AuditEvent) -> bool:
    """An alert the audit service raised: an accepted event of its own. A refused record keeps the type its
    sender claimed, so a service that tried to forge an alert is listed by `refusals`, never here."""
    return event.kind == RecordKind.EVENT.value and event.producer == ALERTING_SERVICE


def _recent(ctx: StackContext, minutes: float | None, limit: int, request: audit_pb2.ListEventsRequest,
            wanted: Callable[[audit_pb2.AuditEvent], bool] = lambda _event: True) -> list[audit_pb2.AuditEvent]:
    if (minutes is not None and minutes <= 0) or limit < 1:
        raise DevstackError("--minutes must be positive and --limit at least 1", "for example: --minutes 60")
    host, settings = ctx.settings.public_host, ctx.settings
    identities = load_identities(settings.infra_dir / "keycloak" / "identities.yaml", set(ctx.service_names))
    auditor = auditor_of(identities)
    keycloak = KeycloakOpenID(server_url=f"https://{host}:{settings.keycloak_port}/", realm_name=identities.realm,
                              client_id=identities.cli_client, verify=str(ctx.ca_file))
    token = str(keycloak.token(auditor, ctx.credentials.users[auditor])["access_token"])
    cli = ctx.pki.paths("cli")
    newest: deque[audit_pb2.AuditEvent] = deque(maxlen=limit)
    with blocking_channel(ctx.grpc_address("audit"), TlsFiles(cli.cert, cli.key, ctx.ca_file), "audit") as ch:
        audit = audit_pb2_grpc.AuditStub(ch)  # type: ignore[no-untyped-call]
        if minutes is not None:
            request.since.FromDatetime(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=minutes))
        while True:
            page = audit.ListEvents(request, metadata=call_metadata(token), timeout=30)
            newest.extend(event for event in page.events if wanted(event))
            if not page.next_page_token:
                return list(newest)
            request.page_token = page.next_page_token
