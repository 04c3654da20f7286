"""`bastion audit refusals`: what a security review reads first, the calls an interceptor denied and the events a
consumer refused, asked of the audit service like any client: mutual TLS with the cli certificate and a token of
the realm's auditor (a demo user of this install), through the same method policy as everyone else."""

import datetime as dt
from collections import deque

import grpc
from keycloak import KeycloakOpenID

from bastion.audit.v1 import audit_pb2, audit_pb2_grpc
from bastion.devstack.context import StackContext
from bastion.devstack.errors import DevstackError
from bastion.devstack.identities import Identities, load_identities
from bastion.grpc.channels import call_metadata, channel_credentials
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
    if minutes <= 0 or limit < 1:
        raise DevstackError("--minutes must be positive and --limit at least 1", "for example: --minutes 60")
    host, settings = ctx.settings.public_host, ctx.settings
    identities = load_identities(settings.infra_dir / "keycloak" / "identities.yaml", set(ctx.service_names))
    auditor = auditor_of(identities)
    keycloak = KeycloakOpenID(server_url=f"https://{host}:{settings.keycloak_port}/", realm_name=identities.realm,
                              client_id=identities.cli_client, verify=str(ctx.ca_file))
    token = str(keycloak.token(auditor, ctx.credentials.users[auditor])["access_token"])
    cli = ctx.pki.paths("cli")
    since = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=minutes)
    newest: deque[audit_pb2.AuditEvent] = deque(maxlen=limit)
    credentials = channel_credentials(TlsFiles(cli.cert, cli.key, ctx.ca_file))
    with grpc.secure_channel(ctx.grpc_address("audit"), credentials) as ch:
        audit = audit_pb2_grpc.AuditStub(ch)  # type: ignore[no-untyped-call]
        request = audit_pb2.ListEventsRequest(refusals_only=True, page_size=PAGE)
        request.since.FromDatetime(since)
        while True:
            page = audit.ListEvents(request, metadata=call_metadata(token), timeout=30)
            newest.extend(page.events)
            if not page.next_page_token:
                return list(newest)
            request.page_token = page.next_page_token
