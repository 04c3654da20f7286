"""The audit service process: wires settings, the kit and the adapters, then serves until stopped.

Run by the devstack as `python -m services.audit.server`; settings come from the BASTION_* environment.
"""

import asyncio
import threading

from keycloak import KeycloakAdmin
from sqlalchemy import inspect

from bastion import service_logs
from bastion.audit.alerts import ALERTS_TOPIC, AlertDetector, load_alert_rules
from bastion.audit.checkpoints import Checkpointer, CheckpointFile
from bastion.audit.postgres import AUDIT_SCHEMA, AuditLog
from bastion.audit.published import read_published
from bastion.audit.v1 import audit_pb2, audit_pb2_grpc
from bastion.devstack.components.keycloak import Keycloak
from bastion.devstack.errors import DevstackError
from bastion.grpc.server import start_server
from bastion.migrations import upgrade
from bastion.revocations.triggers import load_triggers
from bastion.revocations.watcher import KafkaRevocationPublisher, RevocationWatcher, keycloak_events
from bastion.runtime import ServiceRuntime
from bastion.settings import DevstackSettings
from services.audit.adapters.grpc import AuditServicer
from services.audit.adapters.kafka import AuditConsumer, CheckpointPublisher
from services.audit.adapters.postgres import OutboxSecurityRecords, PostgresAlerts, PostgresAuditReaders
from services.audit.handlers import AuditHandlers
from services.audit.settings import AuditSettings

NAME = "audit"
TOPICS = ["accounts.events.v1", "payments.events.v1", "access.decisions.v1", ALERTS_TOPIC]
# The group infra/event-access.yaml grants it as a witness of audit.checkpoints.v1.
WITNESS_GROUP = "audit-witness"


def revocation_watcher(runtime: ServiceRuntime) -> RevocationWatcher:
    """The watch on the realm's admin and user events (bastion/revocations/watcher.py), as the audit service
    account."""
    ctx = runtime.ctx
    keycloak = Keycloak(ctx)
    admin = KeycloakAdmin(server_url=keycloak.server_url, realm_name=keycloak.realm_name, client_id=NAME,
                          client_secret_key=ctx.credentials.keycloak_clients[NAME], verify=str(ctx.ca_file))
    triggers = load_triggers(ctx.settings.infra_dir / "revocation-triggers.yaml")
    admin_events, user_events, error_events = keycloak_events(
        admin, triggers.lasting_event_types, error_event_types=triggers.error_event_types)
    publisher = KafkaRevocationPublisher(runtime.kafka_config, runtime.key)
    return RevocationWatcher(admin_events, user_events, triggers, publisher, publisher.current,
                             runtime.revoked.keep_seconds, error_events=error_events)


def checkpoint_file(runtime: ServiceRuntime, own: AuditSettings, unanchored_ok: bool = False) -> CheckpointFile:
    return CheckpointFile(runtime.ctx.layout.audit_checkpoints_file, runtime.trust(), own.origin, unanchored_ok)


async def serve(settings: DevstackSettings, own: AuditSettings) -> None:
    runtime = ServiceRuntime.load(NAME, settings)
    if not inspect(runtime.engine).has_schema(AUDIT_SCHEMA):
        raise DevstackError(f"the audit log schema {AUDIT_SCHEMA!r} is missing from the audit database",
                            "run `bastion up`: it installs the log as the database owner")
    upgrade(runtime.engine, NAME, schema="public")  # not the log's schema, which search_path puts first
    store = AuditLog()
    handlers = AuditHandlers(PostgresAuditReaders(runtime.engine, store), checkpoint_file(runtime, own),
                             OutboxSecurityRecords(runtime.engine, runtime.outbox()),
                             witness=lambda: read_published(runtime.kafka_config, own.origin, group=WITNESS_GROUP))
    stop = threading.Event()
    load_triggers(settings.infra_dir / "revocation-triggers.yaml")  # refused at start-up when wrong
    # The watch first: the feed (read before serving) waits for its word that it is alive, as every service's does.
    runtime.start_worker("revocation-watcher", lambda: revocation_watcher(runtime), stop)
    runtime.start_revocation_feed(stop)  # before serving: tokens are refused until it was read
    runtime.start_relay(stop)
    # The signer's view of the file: it may cover checkpoints of a key retired before it signed with its new one.
    checkpointer = Checkpointer(runtime.key, checkpoint_file(runtime, own, unanchored_ok=True),
                                own.checkpoint_every_records, own.checkpoint_every_seconds)
    publisher = CheckpointPublisher(runtime.kafka_config)
    rules = load_alert_rules(settings.infra_dir / "alert-rules.yaml")  # refused at start-up when wrong
    runtime.start_worker("consumer", lambda: AuditConsumer(
        runtime.kafka_config, TOPICS, runtime.verifier(), runtime.engine, store, checkpointer, publisher,
        security=handlers.security, alerts=PostgresAlerts(runtime.outbox(), AlertDetector(rules)),
        spans=runtime.spans), stop)
    server, port = await start_server(
        runtime.security(),
        lambda s: audit_pb2_grpc.add_AuditServicer_to_server(AuditServicer(handlers), s),  # type: ignore[no-untyped-call]
        [audit_pb2.DESCRIPTOR.services_by_name["Audit"]],
        port=runtime.grpc_port, host=settings.bind_host, dev_profile=settings.dev_profile,
        health_servicer=runtime.health_servicer,
    )
    await runtime.serve_until_stopped(server, port, stop)


def main() -> None:
    service_logs.configure(NAME)
    asyncio.run(serve(DevstackSettings(), AuditSettings()))


if __name__ == "__main__":
    main()
