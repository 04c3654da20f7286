"""How the labs reach the platform: the target (the running stack of this install, or any part of it pointed
elsewhere by a test), the demo users' and services' credentials, mTLS channels and Kafka clients, and where
evidence is read: the services' log files, the audit log, the dead-letter topics."""

import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from keycloak import KeycloakOpenID
from sqlalchemy import Engine, func, select

from bastion.audit.install_tools import audit_engine
from bastion.audit.postgres import log as audit_log
from bastion.devstack.components.kafka import Kafka
from bastion.devstack.components.keycloak import Keycloak
from bastion.devstack.context import StackContext
from bastion.devstack.event_access import dead_letter_topic, load_policy
from bastion.devstack.stack import Stack
from bastion.events.keys import KeyRing, SigningKey
from bastion.grpc.channels import blocking_channel, call_metadata
from bastion.grpc.server import TlsFiles
from bastion.service_logs import render
from bastion.settings import DevstackSettings

# One sign-in per user and minute: Keycloak's brute-force detection counts quick repeated logins as failures.
TOKEN_REUSE_SECONDS = 60.0
TIMEOUT = 20.0  # seconds a lab waits for one gRPC call
LOG_EXCERPT_CHARS = 320
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}[ T][\d:.]+Z? ")
LEVEL = re.compile(r"^\[(\w+) *\] *")


class LabSetupError(Exception):
    """The lab could not attack: the stack is not running, or a step that must succeed did not (exit 2)."""


@dataclass(frozen=True)
class EventRoute:
    """Where a lab injects events meant for a platform topic, and the verifying consumers that must judge them
    (by the name they sign their dead letters with, header `bastion-consumer`)."""

    topic: str
    consumers: tuple[str, ...]


@dataclass(frozen=True)
class Target:
    """What the labs attack. `running_stack` is the install's own services and topics; a test replaces one
    entry (an endpoint, an event route) with a deliberately weakened copy to show the lab would notice."""

    addresses: Mapping[str, str]  # gRPC service -> host:port
    event_routes: Mapping[str, EventRoute]  # platform topic -> where its events go and who verifies them
    service_logs: Mapping[str, Path]  # service -> its log file, read for the log line of a refusal
    verdict_wait_seconds: float = 30.0  # how long the consumers have to dead-letter an injected event
    context_wait_seconds: float = 8.0  # how long to wait for context evidence (an audit record, a log line)

    @classmethod
    def running_stack(cls, ctx: StackContext) -> "Target":
        access = load_policy(ctx.settings.infra_dir / "event-access.yaml", set(ctx.service_names))
        routes = {name: EventRoute(name, tuple(sorted(topic.consumers))) for name, topic in access.topics.items()}
        return cls(
            addresses={name: ctx.grpc_address(name) for name in ctx.service_names},
            event_routes=routes,
            service_logs={name: ctx.layout.log_file(name) for name in ctx.service_names},
        )


@dataclass(frozen=True)
class Answer:
    """How a gRPC call ended: OK with its reply, or a status code with its details."""

    code: grpc.StatusCode
    details: str = ""
    reply: Any = None

    @property
    def ok(self) -> bool:
        return bool(self.code == grpc.StatusCode.OK)

    def __str__(self) -> str:
        return "OK" if self.ok else f"{self.code.name}: {self.details}"


def answer(call: Callable[[], Any]) -> Answer:
    try:
        reply = call()
    except grpc.RpcError as error:
        return Answer(error.code(), error.details() or "")
    return Answer(grpc.StatusCode.OK, reply=reply)


@dataclass(frozen=True)
class Delivery:
    """A record handed to Kafka: where it landed (`topic/partition/offset`, the dead letters' `bastion-source`),
    or the broker's refusal."""

    error: KafkaError | None
    source: str = ""


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    kind: str
    principal: str | None
    action: str | None
    decision: str | None
    reason: str | None

    def __str__(self) -> str:
        parts = [f"seq {self.seq}", self.kind, self.principal, self.action, self.decision, self.reason]
        return " ".join(part for part in parts if part)


@dataclass
class Session:
    """One `bastion lab` run: the install's context, the target, and credentials fetched once and reused."""

    ctx: StackContext
    target: Target
    _user_tokens: dict[str, tuple[float, str]] = field(default_factory=dict)
    _service_tokens: dict[str, tuple[float, str]] = field(default_factory=dict)
    _channels: dict[tuple[str, str], grpc.Channel] = field(default_factory=dict)
    _sign_in: threading.Lock = field(default_factory=threading.Lock)
    _audit: Engine | None = None

    @classmethod
    def of_running_stack(cls, settings: DevstackSettings) -> "Session":
        """The session of this install's stack; refuses when a component is not healthy."""
        stack = Stack(settings, progress=lambda message: None)
        status = stack.status()
        down = sorted(name for name, entry in status["components"].items() if not entry["healthy"])
        if down:
            raise LabSetupError(f"the stack of {status['state_dir']} is not running ({', '.join(down)} not healthy): "
                                "start it with `bastion up`")
        ctx = stack.context()
        return cls(ctx, Target.running_stack(ctx))

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        if self._audit is not None:
            self._audit.dispose()

    # --- identities ---

    def keycloak(self, client_id: str, secret: str | None = None) -> Any:
        keycloak = Keycloak(self.ctx)
        return KeycloakOpenID(server_url=keycloak.server_url, realm_name=keycloak.realm_name, client_id=client_id,
                              client_secret_key=secret, verify=str(self.ctx.ca_file))

    def user_tokens(self, user: str) -> dict[str, Any]:
        """A fresh sign-in of demo USER through the `bastion-cli` client: access, ID and refresh tokens."""
        try:
            tokens: dict[str, Any] = self.keycloak("bastion-cli").token(user, self.ctx.credentials.users[user])
        except Exception as error:  # any failure to sign in leaves the lab nothing to attack with
            raise LabSetupError(f"{user} could not sign in to Keycloak: {type(error).__name__}") from error
        return tokens

    def sign_out(self, refresh_token: str) -> None:
        """End the Keycloak session REFRESH_TOKEN belongs to (its access tokens stay unexpired)."""
        try:
            self.keycloak("bastion-cli").logout(refresh_token)
        except Exception as error:
            raise LabSetupError(f"Keycloak did not end the session: {type(error).__name__}") from error

    def user_token(self, user: str) -> str:
        with self._sign_in:
            fetched_at, token = self._user_tokens.get(user, (0.0, ""))
            if time.monotonic() - fetched_at > TOKEN_REUSE_SECONDS:
                fetched_at, token = time.monotonic(), str(self.user_tokens(user)["access_token"])
                self._user_tokens[user] = (fetched_at, token)
            return token

    def service_token(self, service: str) -> str:
        """SERVICE's own client-credentials access token (what its Downstream sends)."""
        with self._sign_in:
            fetched_at, token = self._service_tokens.get(service, (0.0, ""))
            if time.monotonic() - fetched_at > TOKEN_REUSE_SECONDS:
                client = self.keycloak(service, self.ctx.credentials.keycloak_clients[service])
                try:
                    token = str(client.token(grant_type="client_credentials")["access_token"])
                except Exception as error:
                    raise LabSetupError(f"no service token for {service}: {type(error).__name__}") from error
                fetched_at = time.monotonic()
                self._service_tokens[service] = (fetched_at, token)
            return token

    def as_user(self, user: str, correlation_id: str) -> tuple[tuple[str, str], ...]:
        return call_metadata(self.user_token(user), correlation_id)

    def tls(self, identity: str) -> TlsFiles:
        """The dev-CA certificate and key of IDENTITY (a service, or `cli` for the bastion command)."""
        paths = self.ctx.pki.paths(identity)
        return TlsFiles(paths.cert, paths.key, self.ctx.ca_file)

    def signing_key(self, producer: str) -> SigningKey:
        """PRODUCER's event signing key from the install's key ring (the lab plays the producer's relay)."""
        return self.key_ring().signing_key(producer)

    def key_ring(self) -> KeyRing:
        """The install's event key ring, as `bastion keys` works on it."""
        return KeyRing(self.ctx.layout.event_keys_dir)

    # --- gRPC ---

    def channel(self, service: str, identity: str = "cli") -> grpc.Channel:
        """A channel to SERVICE of the target over mutual TLS, presenting IDENTITY's certificate."""
        key = (service, identity)
        if key not in self._channels:
            self._channels[key] = blocking_channel(self.target.addresses[service], self.tls(identity), service)
        return self._channels[key]

    # --- Kafka ---

    def kafka_config(self, principal: str) -> dict[str, Any]:
        return Kafka(self.ctx).client_config(principal, self.ctx.credentials.kafka[principal])

    def publish(self, principal: str, topic: str, value: bytes, key: bytes = b"lab",
                headers: list[tuple[str, bytes]] | None = None) -> Delivery:
        """Produce VALUE (with HEADERS) to TOPIC as Kafka PRINCIPAL and wait for the broker's answer."""
        producer = Producer({**self.kafka_config(principal), "enable.idempotence": True, "acks": "all",
                             "message.timeout.ms": 15000})
        outcome: list[Delivery] = []

        def delivered(error: KafkaError | None, message: Any) -> None:
            where = "" if error else f"{message.topic()}/{message.partition()}/{message.offset()}"
            outcome.append(Delivery(error, where))

        producer.produce(topic, value=value, key=key, headers=headers or [], on_delivery=delivered)
        producer.flush(20)
        if not outcome:
            raise LabSetupError(f"Kafka gave no answer for a record to {topic} within 20s")
        return outcome[0]

    def behind(self, groups_by_topic: Mapping[str, Iterable[str]], wait_seconds: float) -> list[str]:
        """What the consumer groups of GROUPS_BY_TOPIC have still not read of what their topics held now, after
        waiting up to WAIT_SECONDS (`KafkaAdmin.wait_until_read`)."""
        return Kafka(self.ctx).admin().wait_until_read(groups_by_topic, wait_seconds)

    # --- evidence ---

    def audit_engine(self) -> Engine:
        """The audit database as the audit role, which may only read and append the log (as `bastion audit
        verify` reads it)."""
        if self._audit is None:
            self._audit = audit_engine(self.ctx)
        return self._audit

    def watch(self) -> "Watch":
        return Watch(self)


class Watch:
    """Evidence written from now on: new lines of the services' log files, new records of the audit log."""

    def __init__(self, session: Session) -> None:
        self.session = session
        logs = session.target.service_logs
        self.log_offsets = {name: path.stat().st_size if path.exists() else 0 for name, path in logs.items()}
        with session.audit_engine().connect() as conn:
            self.audit_after = int(conn.execute(select(func.coalesce(func.max(audit_log.c.seq), 0))).scalar_one())

    def log_lines(self, service: str, *needles: str, wait_seconds: float | None = None) -> list[str]:
        """New lines of SERVICE's log holding every one of NEEDLES, waiting up to WAIT_SECONDS for the first
        (by default, the target's wait for context evidence)."""
        path = self.session.target.service_logs.get(service)
        if path is None:
            return []
        wait = self.session.target.context_wait_seconds if wait_seconds is None else wait_seconds
        deadline = time.monotonic() + wait
        while True:
            text = self.new_text(service)
            found = [_excerpt(line) for line in text.splitlines() if all(needle in line for needle in needles)]
            if found or time.monotonic() >= deadline:
                return found
            time.sleep(0.2)

    def new_text(self, service: str) -> str:
        """Everything SERVICE's log gained since the watch began, as written (bytes that are no UTF-8 replaced)."""
        path = self.session.target.service_logs.get(service)
        if path is None or not path.exists():
            return ""
        with path.open("rb") as stream:
            stream.seek(self.log_offsets.get(service, 0))
            return stream.read().decode(errors="replace")

    def audit_entries(self, correlation_id: str, count: int = 1, kind: str | None = None) -> list[AuditEntry]:
        """New audit log records (of KIND) carrying CORRELATION_ID, once there are COUNT (or the wait is over)."""
        deadline = time.monotonic() + self.session.target.context_wait_seconds
        query = (select(audit_log.c.seq, audit_log.c.kind, audit_log.c.principal, audit_log.c.action,
                        audit_log.c.decision, audit_log.c.reason)
                 .where(audit_log.c.seq > self.audit_after, audit_log.c.correlation_id == correlation_id)
                 .order_by(audit_log.c.seq))
        if kind is not None:
            query = query.where(audit_log.c.kind == kind)
        while True:
            with self.session.audit_engine().connect() as conn:
                found = [AuditEntry(*row) for row in conn.execute(query)]
            if len(found) >= count or time.monotonic() >= deadline:
                return found
            time.sleep(0.5)


def _excerpt(line: str) -> str:
    """A service's JSON log line as `service_logs.render` shows it, or another component's line without its
    timestamp and padding; cut to a readable length."""
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if isinstance(record, dict):
        text = render(record)
    else:
        text = " ".join(line.split())
        text = TIMESTAMP.sub("", text)
        text = LEVEL.sub(r"\1: ", text)
    return text if len(text) <= LOG_EXCERPT_CHARS else text[: LOG_EXCERPT_CHARS - 1] + "…"


# Errors of a read that will not come right by waiting (others, a broker reconnecting say, pass by).
UNREADABLE = frozenset({KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED,
                        KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION,
                        KafkaError.SASL_AUTHENTICATION_FAILED, KafkaError._AUTHENTICATION, KafkaError._SSL})


class TopicTail:
    """The records of TOPIC from now on (every partition from its current end), read as the broker's admin, as an
    investigator would; no consumer group is joined and no offset committed."""

    def __init__(self, session: Session, topic: str) -> None:
        self.topic = topic
        self.reader = Consumer({**session.kafka_config("admin"), "group.id": f"lab-{uuid.uuid4()}",
                                "enable.auto.commit": False})
        metadata = self.reader.list_topics(topic, timeout=10).topics[topic]
        if metadata.error is not None:
            self.reader.close()
            raise LabSetupError(f"no topic {topic}: {metadata.error.str()}")
        starts = []
        for partition in metadata.partitions:
            _, high = self.reader.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            starts.append(TopicPartition(topic, partition, high))
        self.reader.assign(starts)

    def records(self, wait_seconds: float) -> Iterator[Any]:
        """New records as they arrive, until WAIT_SECONDS have passed (or the caller stops iterating). A topic this
        reader may not or cannot read stops the lab: its silence would read as "nothing was dead-lettered"."""
        deadline = time.monotonic() + wait_seconds
        while time.monotonic() < deadline:
            message = self.reader.poll(0.5)
            if message is None:
                continue
            error = message.error()
            if error is None:
                yield message
            elif error.code() in UNREADABLE:
                raise LabSetupError(f"{self.topic} cannot be read ({error.str()}): the lab cannot tell")

    def close(self) -> None:
        self.reader.close()


class DeadLetters(TopicTail):
    """The records dead-lettered to `<TOPIC>.dlq` from now on."""

    def __init__(self, session: Session, topic: str) -> None:
        super().__init__(session, dead_letter_topic(topic))

    def verdicts(self, source: str, consumers: tuple[str, ...], wait_seconds: float) -> dict[str, dict[str, str]]:
        """The dead-letter headers each of CONSUMERS wrote for the record at SOURCE (`topic/partition/offset`),
        once all have, or when the wait is over."""
        found: dict[str, dict[str, str]] = {}
        for message in self.records(wait_seconds):
            headers = {name: value.decode(errors="replace") for name, value in message.headers() or []}
            consumer = headers.get("bastion-consumer", "")
            if headers.get("bastion-source") == source and consumer in consumers:
                found[consumer] = headers
            if set(found) >= set(consumers):
                break
        return found


def new_correlation_id(lab: str) -> str:
    return f"lab-{lab}-{uuid.uuid4().hex[:12]}"
