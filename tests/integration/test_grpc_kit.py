"""The gRPC kit against real Keycloak tokens, dev-CA certificates, Redis and Kafka, on the Probe service.

The negative tests are generated from the service descriptors: every RPC of every service registered in
SERVICES is refused without a token, with a forged token and without a client certificate."""

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import structlog
from confluent_kafka import Consumer
from cryptography import x509
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from bastion.access.v1.decision_pb2 import DECISION_ALLOW, DECISION_DENY, AccessDecision
from bastion.devstack.components.kafka import Kafka
from bastion.devstack.context import StackContext
from bastion.devstack.pki import DevPki, issue_certificate
from bastion.events.keys import KeyRing
from bastion.events.signing import SignatureChecker, verify_signature
from bastion.events.v1.envelope_pb2 import Envelope, EnvelopeBundle
from bastion.events.verify import is_bundle
from bastion.grpc.audit import MemoryAccessAudit
from bastion.grpc.channels import call_metadata, channel_credentials
from bastion.grpc.interceptor import UNKNOWN_METHOD
from bastion.grpc.names import spiffe_id
from bastion.grpc.ratelimit import RateLimit
from bastion.grpc.server import MAX_MESSAGE_BYTES, TlsFiles
from bastion.grpc.spans import SpanRecorder
from bastion.probe.v1 import probe_pb2, probe_pb2_grpc
from bastion.testing.probe import ProbeServicer
from tests.integration.forgeries import code_of, forged_tokens, generic_call
from tests.integration.grpc_harness import (
    SERVICE,
    ProbeServer,
    kafka_audit,
    service_token,
    start_probe,
    tls_of,
    user_token,
)

SERVICES: list[ServiceDescriptor] = [probe_pb2.DESCRIPTOR.services_by_name["Probe"]]
ALL_METHODS = [(service, method) for service in SERVICES for method in service.methods]


@pytest.fixture(scope="module")
def keys(ctx: StackContext) -> KeyRing:
    return KeyRing(ctx.layout.event_keys_dir)


@pytest.fixture(scope="module")
def probe(ctx: StackContext, keys: KeyRing) -> Iterator[ProbeServer]:
    audit = kafka_audit(ctx, keys.signing_key("accounts"))
    server = start_probe(ctx, audit)
    server.extras["audit"] = audit
    yield server
    server.stop()


def stub(ctx: StackContext, port: int, tls: TlsFiles | None) -> probe_pb2_grpc.ProbeStub:
    target = f"localhost:{port}"
    if tls is None:
        anonymous = grpc.ssl_channel_credentials(root_certificates=ctx.ca_file.read_bytes())
        return probe_pb2_grpc.ProbeStub(grpc.secure_channel(target, anonymous))
    return probe_pb2_grpc.ProbeStub(grpc.secure_channel(target, channel_credentials(tls)))


@pytest.fixture(scope="module")
def forged(ctx: StackContext) -> dict[str, str]:
    return forged_tokens(ctx)


ATTACKS = ["alg none", "HS256 keyed with the realm public key", "edited payload", "stripped signature",
           "audience of another service", "another issuer", "ID token", "refresh token", "key the realm never had",
           "realm key id, foreign key", "garbage"]


@pytest.mark.parametrize("attack", ATTACKS)
def test_forged_or_wrong_tokens_are_unauthenticated(ctx: StackContext, probe: ProbeServer, forged: dict[str, str],
                                                    attack: str) -> None:
    client = stub(ctx, probe.port, tls_of(ctx, "cli"))
    correlation = f"it-{uuid.uuid4()}"
    metadata = call_metadata(forged[attack], correlation)
    with structlog.testing.capture_logs() as logs:
        assert code_of(lambda: client.Whoami(probe_pb2.WhoamiRequest(), metadata=metadata, timeout=10)) == \
            grpc.StatusCode.UNAUTHENTICATED
    refusals = [entry for entry in logs if entry.get("correlation_id") == correlation]
    assert [(e["event"], e["code"]) for e in refusals] == [("call_refused", "UNAUTHENTICATED")]
    assert forged[attack] not in repr(refusals), "the log never carries the token"


def test_no_token_is_unauthenticated(ctx: StackContext, probe: ProbeServer) -> None:
    client = stub(ctx, probe.port, tls_of(ctx, "cli"))
    with pytest.raises(grpc.RpcError) as refused:
        client.Whoami(probe_pb2.WhoamiRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "missing bearer token" in refused.value.details()


def test_expired_token_is_unauthenticated(ctx: StackContext) -> None:
    """A real token seen by a server whose clock is ten minutes ahead: expired, nothing else wrong."""
    late = start_probe(ctx, MemoryAccessAudit(), clock_skew=600)
    try:
        client = stub(ctx, late.port, tls_of(ctx, "cli"))
        token = user_token(ctx, "alice")["access_token"]
        with pytest.raises(grpc.RpcError) as refused:
            client.Whoami(probe_pb2.WhoamiRequest(), metadata=call_metadata(token), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "expired" in refused.value.details()
        assert token not in refused.value.details()
    finally:
        late.stop()


def test_valid_user_token_reaches_the_handler_with_its_principal(ctx: StackContext, probe: ProbeServer) -> None:
    client = stub(ctx, probe.port, tls_of(ctx, "cli"))
    correlation = f"it-{uuid.uuid4()}"
    reply = client.Whoami(probe_pb2.WhoamiRequest(), metadata=call_metadata(
        user_token(ctx, "alice")["access_token"], correlation), timeout=10)
    assert (reply.username, list(reply.roles), reply.peer_identity, reply.correlation_id) == \
        ("alice", ["customer"], "cli", correlation)


def test_a_call_continues_its_callers_trace_in_a_span_of_its_own(ctx: StackContext, probe: ProbeServer) -> None:
    client = stub(ctx, probe.port, tls_of(ctx, "cli"))
    token = user_token(ctx, "alice")["access_token"]
    trace, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    reply = client.Whoami(probe_pb2.WhoamiRequest(), metadata=(
        *call_metadata(token), ("traceparent", f"00-{trace}-{parent}-01")), timeout=10)
    assert (reply.trace_id, reply.parent_span_id) == (trace, parent)
    assert len(reply.span_id) == 16 and reply.span_id != parent


class CrashingProbe(ProbeServicer):
    async def Whoami(self, request: probe_pb2.WhoamiRequest, context: grpc.aio.ServicerContext
                     ) -> probe_pb2.WhoamiResponse:
        raise RuntimeError("a bug in the handler")


class AbortingProbe(ProbeServicer):
    async def Whoami(self, request: probe_pb2.WhoamiRequest, context: grpc.aio.ServicerContext
                     ) -> probe_pb2.WhoamiResponse:
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        raise AssertionError("unreachable: abort raises")


class CodeSettingProbe(ProbeServicer):
    """Answers with a status of its own without aborting (set_code, then returns)."""

    async def Whoami(self, request: probe_pb2.WhoamiRequest, context: grpc.aio.ServicerContext
                     ) -> probe_pb2.WhoamiResponse:
        context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
        context.set_details("not now")
        return probe_pb2.WhoamiResponse()


class SlowProbe(ProbeServicer):
    async def Whoami(self, request: probe_pb2.WhoamiRequest, context: grpc.aio.ServicerContext
                     ) -> probe_pb2.WhoamiResponse:
        await asyncio.sleep(5)
        return await super().Whoami(request, context)


# Each probe's Whoami as the caller sees it, and as its span records it (code, status).
WHOAMI = {ProbeServicer: (grpc.StatusCode.OK, (0, "UNSET")), CrashingProbe: (grpc.StatusCode.INTERNAL, (13, "ERROR")),
          AbortingProbe: (grpc.StatusCode.NOT_FOUND, (5, "UNSET")),
          CodeSettingProbe: (grpc.StatusCode.FAILED_PRECONDITION, (9, "UNSET")),
          SlowProbe: (grpc.StatusCode.DEADLINE_EXCEEDED, (1, "UNSET"))}  # the server sees the deadline as a cancel


@pytest.mark.parametrize("servicer", list(WHOAMI))
def test_a_sampled_call_leaves_a_server_span_whose_id_its_handler_hands_on(
    ctx: StackContext, keys: KeyRing, servicer: type[ProbeServicer],
) -> None:
    """Spans of sampled calls (bastion/grpc/spans.py): an admitted call, unary or streamed, leaves one span with its
    status however it ends (answered, crashed, aborted by its handler, answered with a status its handler set,
    cancelled at its deadline); a refused call,
    a call the caller did not sample and a call with no trace of its own leave none."""
    exported = InMemorySpanExporter()
    spans = SpanRecorder(SERVICE, processor=SimpleSpanProcessor(exported))
    server = start_probe(ctx, MemoryAccessAudit(), servicer=servicer(), spans=spans)
    try:
        client = stub(ctx, server.port, tls_of(ctx, "cli"))
        token = user_token(ctx, "alice")["access_token"]
        trace, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]

        def sampled(flags: str = "01") -> tuple[tuple[str, str], ...]:
            return (*call_metadata(token, f"it-{uuid.uuid4()}"), ("traceparent", f"00-{trace}-{parent}-{flags}"))

        expected_code, _recorded = WHOAMI[servicer]
        try:
            reply = client.Whoami(probe_pb2.WhoamiRequest(), metadata=sampled(), timeout=1)
            assert expected_code is grpc.StatusCode.OK
        except grpc.RpcError as error:
            assert error.code() is expected_code
        assert code_of(lambda: client.TellerOnly(probe_pb2.TellerOnlyRequest(), metadata=sampled(), timeout=10)) \
            == grpc.StatusCode.PERMISSION_DENIED
        assert [item.value for item in client.Countdown(probe_pb2.CountdownRequest(start=2), metadata=sampled(),
                                                        timeout=10)] == [2, 1]
        client.Countdown(probe_pb2.CountdownRequest(start=1), metadata=sampled("00"), timeout=10).next()
        client.Countdown(probe_pb2.CountdownRequest(start=1), metadata=call_metadata(token), timeout=10).next()
        deadline = time.monotonic() + 5  # a cancelled handler ends its span as its task unwinds
        while len(exported.get_finished_spans()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.stop()
        spans.shutdown()
    recorded = {span.name.rsplit("/", 1)[1]: span for span in exported.get_finished_spans()}
    assert sorted(recorded) == ["Countdown", "Whoami"], "one span per admitted sampled call, none for the others"
    assert len(exported.get_finished_spans()) == 2
    assert all(f"{span.context.trace_id:032x}" == trace and span.parent is not None
               and f"{span.parent.span_id:016x}" == parent for span in recorded.values())
    status = {name: (dict(span.attributes or {})["rpc.grpc.status_code"], span.status.status_code.name)
              for name, span in recorded.items()}
    assert status == {"Whoami": WHOAMI[servicer][1], "Countdown": (0, "UNSET")}
    if servicer is ProbeServicer:
        assert reply.span_id == f"{recorded['Whoami'].context.span_id:016x}", "the handler hands on the span's id"
        assert dict(recorded["Whoami"].attributes or {})["bastion.peer_service"] == "cli"


def test_a_malformed_traceparent_starts_a_new_trace_and_is_never_echoed(ctx: StackContext, probe: ProbeServer) -> None:
    client = stub(ctx, probe.port, tls_of(ctx, "cli"))
    token = user_token(ctx, "alice")["access_token"]
    correlation = f"it-{uuid.uuid4()}"
    bogus = f"00-{'A' * 32}-{'b' * 16}-01"  # upper-case hex: not a trace id
    reply = client.Whoami(probe_pb2.WhoamiRequest(), metadata=(
        *call_metadata(token, correlation), ("traceparent", bogus), ("tracestate", "evil=1")), timeout=10)
    assert reply.parent_span_id == "" and len(reply.trace_id) == 32 and reply.trace_id.lower() != "a" * 32
    with structlog.testing.capture_logs() as logs:
        code_of(lambda: client.TellerOnly(probe_pb2.TellerOnlyRequest(), metadata=(
            *call_metadata(token, correlation), ("traceparent", bogus)), timeout=10))
    [refusal] = [entry for entry in logs if entry.get("correlation_id") == correlation]
    assert refusal["event"] == "call_refused" and len(refusal["trace_id"]) == 32 and bogus not in repr(refusal)


def test_connection_without_client_certificate_never_reaches_a_handler(ctx: StackContext, probe: ProbeServer) -> None:
    client = stub(ctx, probe.port, None)
    token = user_token(ctx, "alice")["access_token"]
    assert code_of(lambda: client.Whoami(probe_pb2.WhoamiRequest(), metadata=call_metadata(token), timeout=10)) == \
        grpc.StatusCode.UNAVAILABLE


def test_certificate_from_another_ca_never_reaches_a_handler(ctx: StackContext, probe: ProbeServer,
                                                             tmp_path: Path) -> None:
    other = DevPki(tmp_path, leaf_days=1, reissue_when_days_left=0)
    other.ensure(["cli"])
    foreign = TlsFiles(other.paths("cli").cert, other.paths("cli").key, ctx.ca_file)
    client = stub(ctx, probe.port, foreign)
    token = user_token(ctx, "alice")["access_token"]
    assert code_of(lambda: client.Whoami(probe_pb2.WhoamiRequest(), metadata=call_metadata(token), timeout=10)) == \
        grpc.StatusCode.UNAVAILABLE


URI = x509.UniformResourceIdentifier
NOT_ONE_IDENTITY = {
    "no SPIFFE URI": ("cli", [x509.DNSName("localhost")]),
    "two SPIFFE URIs": ("cli", [URI(spiffe_id("cli")), URI(spiffe_id("payments"))]),
    "another trust domain": ("cli", [URI("spiffe://elsewhere.example/service/payments")]),
    "a path below a service": ("cli", [URI(spiffe_id("payments") + "/admin")]),
    "no SANs, a SPIFFE ID as common name": (spiffe_id("payments"), []),
}


@pytest.mark.parametrize("case", sorted(NOT_ONE_IDENTITY))
def test_a_dev_ca_certificate_without_exactly_one_bastion_identity_never_reaches_a_handler(
    ctx: StackContext, probe: ProbeServer, tmp_path: Path, case: str
) -> None:
    """Signed by the dev CA, so the TLS handshake succeeds, but the certificate names no single service of
    this trust domain: the call is refused before authorisation, whatever token comes with it."""
    common_name, names = NOT_ONE_IDENTITY[case]
    cert, key = issue_certificate(ctx.pki.authority(), common_name, 1, alternative_names=names)
    issued = DevPki(tmp_path, leaf_days=1, reissue_when_days_left=0).write("odd", cert, key)
    client = stub(ctx, probe.port, TlsFiles(issued.cert, issued.key, ctx.ca_file))
    token = service_token(ctx, "payments")
    with pytest.raises(grpc.RpcError) as refused:
        client.PaymentsOnly(probe_pb2.PaymentsOnlyRequest(), metadata=call_metadata(token), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, case
    assert "client certificate has no Bastion identity" in (refused.value.details() or "")


def test_service_identity_x_calling_a_method_reserved_to_y_is_denied(ctx: StackContext, probe: ProbeServer) -> None:
    as_notifications = stub(ctx, probe.port, tls_of(ctx, "notifications"))
    notifications_token = service_token(ctx, "notifications")
    payments_token = service_token(ctx, "payments")
    denied = code_of(lambda: as_notifications.PaymentsOnly(
        probe_pb2.PaymentsOnlyRequest(), metadata=call_metadata(payments_token), timeout=10))
    assert denied == grpc.StatusCode.PERMISSION_DENIED, "a payments token over a notifications certificate"
    assert notifications_token
    as_payments = stub(ctx, probe.port, tls_of(ctx, "payments"))
    reply = as_payments.PaymentsOnly(probe_pb2.PaymentsOnlyRequest(), metadata=call_metadata(payments_token),
                                     timeout=10)
    assert reply.peer_identity == "payments"


def test_user_without_the_role_is_denied_and_with_it_allowed(ctx: StackContext, probe: ProbeServer) -> None:
    client = stub(ctx, probe.port, tls_of(ctx, "cli"))
    alice = user_token(ctx, "alice")["access_token"]
    tina = user_token(ctx, "tina")["access_token"]
    assert code_of(lambda: client.TellerOnly(probe_pb2.TellerOnlyRequest(), metadata=call_metadata(alice),
                                             timeout=10)) == grpc.StatusCode.PERMISSION_DENIED
    assert client.TellerOnly(probe_pb2.TellerOnlyRequest(), metadata=call_metadata(tina), timeout=10).username == "tina"


def test_a_method_missing_from_the_policy_is_denied(ctx: StackContext, probe: ProbeServer) -> None:
    channel = grpc.secure_channel(f"localhost:{probe.port}", channel_credentials(tls_of(ctx, "cli")))
    unlisted = channel.unary_unary("/bastion.probe.v1.Probe/Transfer", request_serializer=lambda _: b"",
                                   response_deserializer=lambda data: data)
    token = user_token(ctx, "ada")["access_token"]
    assert code_of(lambda: unlisted(b"", metadata=call_metadata(token), timeout=10)) == \
        grpc.StatusCode.PERMISSION_DENIED


def test_calls_to_unserved_paths_are_counted_under_one_label_whatever_the_path(
    ctx: StackContext, probe: ProbeServer
) -> None:
    """The refusal counter's method label is the caller's path only for methods the server serves: arbitrary paths
    would otherwise each make a series of their own (metrics grown without bound by any caller)."""
    channel = grpc.secure_channel(f"localhost:{probe.port}", channel_credentials(tls_of(ctx, "cli")))
    token = user_token(ctx, "alice")["access_token"]
    labels = {"service": "accounts", "method": UNKNOWN_METHOD, "code": "PERMISSION_DENIED"}
    before = REGISTRY.get_sample_value("bastion_grpc_refused_total", labels) or 0.0
    paths = [f"/bastion.probe.v1.Probe/Nothing{uuid.uuid4().hex}" for _ in range(3)] + [f"/x/{'y' * 1000}"]
    for path in paths:
        call = channel.unary_unary(path, request_serializer=lambda _: b"", response_deserializer=lambda data: data)
        assert code_of(functools.partial(call, b"", metadata=call_metadata(token), timeout=10)) == \
            grpc.StatusCode.PERMISSION_DENIED
    assert REGISTRY.get_sample_value("bastion_grpc_refused_total", labels) == before + len(paths)
    series = {sample.labels["method"] for metric in REGISTRY.collect() if metric.name == "bastion_grpc_refused"
              for sample in metric.samples}
    assert not series & set(paths)
    channel.close()


@pytest.mark.parametrize(("service", "method"), ALL_METHODS, ids=[f"{s.name}.{m.name}" for s, m in ALL_METHODS])
def test_every_rpc_refuses_calls_without_token_forged_token_or_certificate(
    ctx: StackContext, probe: ProbeServer, forged: dict[str, str], service: ServiceDescriptor,
    method: MethodDescriptor,
) -> None:
    with_cert = grpc.secure_channel(f"localhost:{probe.port}", channel_credentials(tls_of(ctx, "cli")))
    call = generic_call(with_cert, service, method)
    assert code_of(lambda: call(timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: call(metadata=call_metadata(forged["alg none"]), timeout=10)) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: call(metadata=call_metadata(forged["edited payload"]), timeout=10)) == \
        grpc.StatusCode.UNAUTHENTICATED
    without_cert = grpc.secure_channel(f"localhost:{probe.port}",
                                       grpc.ssl_channel_credentials(root_certificates=ctx.ca_file.read_bytes()))
    no_cert_call = generic_call(without_cert, service, method)
    assert code_of(lambda: no_cert_call(timeout=10)) == grpc.StatusCode.UNAVAILABLE


def test_streaming_rpc_is_guarded_and_served(ctx: StackContext, probe: ProbeServer) -> None:
    client = stub(ctx, probe.port, tls_of(ctx, "cli"))
    alice = user_token(ctx, "alice")["access_token"]
    values = [r.value for r in client.Countdown(probe_pb2.CountdownRequest(start=3), metadata=call_metadata(alice),
                                                timeout=10)]
    assert values == [3, 2, 1]
    ada = user_token(ctx, "ada")["access_token"]
    assert code_of(lambda: list(client.Countdown(probe_pb2.CountdownRequest(start=3), metadata=call_metadata(ada),
                                                 timeout=10))) == grpc.StatusCode.PERMISSION_DENIED


def test_every_decision_is_a_signed_access_decision_event_with_the_correlation_id(
    ctx: StackContext, probe: ProbeServer, keys: KeyRing,
) -> None:
    client = stub(ctx, probe.port, tls_of(ctx, "cli"))
    alice = user_token(ctx, "alice")["access_token"]
    calls = {
        f"allow-{uuid.uuid4()}": (client.Whoami, probe_pb2.WhoamiRequest(), alice, DECISION_ALLOW),
        f"deny-role-{uuid.uuid4()}": (client.TellerOnly, probe_pb2.TellerOnlyRequest(), alice, DECISION_DENY),
        f"deny-token-{uuid.uuid4()}": (client.Whoami, probe_pb2.WhoamiRequest(), "forged.token.x", DECISION_DENY),
        f"deny-none-{uuid.uuid4()}": (client.Whoami, probe_pb2.WhoamiRequest(), None, DECISION_DENY),
    }
    for correlation, (method, request, token, _) in calls.items():
        with contextlib.suppress(grpc.RpcError):
            method(request, metadata=call_metadata(token, correlation), timeout=10)
    probe.extras["audit"].flush()
    reader = Consumer({**Kafka(ctx).client_config("admin", ctx.credentials.kafka["admin"]),
                       "group.id": f"it-{uuid.uuid4()}", "auto.offset.reset": "earliest"})
    reader.subscribe(["access.decisions.v1"])
    found: dict[str, AccessDecision] = {}
    trust = keys.trust_store()
    deadline = time.monotonic() + 60
    while len(found) < len(calls) and time.monotonic() < deadline:
        message = reader.poll(1)
        if message is None or message.error():
            continue
        # The publisher sends one signed bundle per batch of decisions (consumers' reports may come alone).
        if is_bundle(message.headers()):
            signed = EnvelopeBundle.FromString(message.value())
            envelopes = [Envelope.FromString(member) for member in signed.envelopes]
            if not any(envelope.correlation_id in calls for envelope in envelopes):
                continue
            SignatureChecker().verify_bundle(signed, envelopes, trust.public_key(envelopes[0].producer,
                                                                                 envelopes[0].key_id))
        else:
            envelopes = [Envelope.FromString(message.value())]
            if envelopes[0].correlation_id not in calls:
                continue
            verify_signature(envelopes[0], trust.public_key(envelopes[0].producer, envelopes[0].key_id))
        for envelope in envelopes:
            if envelope.correlation_id in calls:
                found[envelope.correlation_id] = AccessDecision.FromString(envelope.payload)
    reader.close()
    assert set(found) == set(calls)
    for correlation, (_, _, _, expected) in calls.items():
        assert found[correlation].decision == expected
        assert found[correlation].correlation_id == correlation
        assert found[correlation].service_identity == "cli"


def test_a_burst_over_the_rate_limit_is_exhausted_for_that_principal_only(ctx: StackContext) -> None:
    limited = start_probe(ctx, MemoryAccessAudit(), rate_limit=RateLimit(calls=5, window_seconds=60))
    try:
        client = stub(ctx, limited.port, tls_of(ctx, "cli"))
        bob = user_token(ctx, "bob")["access_token"]
        sam = user_token(ctx, "sam")["access_token"]
        codes = []
        for _ in range(12):
            try:
                client.Whoami(probe_pb2.WhoamiRequest(), metadata=call_metadata(bob), timeout=10)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.append(error.code())
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        assert codes.count(grpc.StatusCode.OK) <= 10  # at most two windows' worth if the minute turns
        assert client.Whoami(probe_pb2.WhoamiRequest(), metadata=call_metadata(sam), timeout=10).username == "sam"
    finally:
        limited.stop()


class CrashingProbeServicer(ProbeServicer):
    """A Whoami that fails the way a bug does: an exception whose message holds things no caller may see."""

    SECRET = "postgresql://payments:hunter2-not-for-callers@db/payments"

    async def Whoami(self, request: probe_pb2.WhoamiRequest, context: grpc.aio.ServicerContext
                     ) -> probe_pb2.WhoamiResponse:
        raise RuntimeError(f"could not connect to {self.SECRET}")


def test_a_crashing_handler_answers_internal_with_only_the_correlation_id(ctx: StackContext) -> None:
    server = start_probe(ctx, MemoryAccessAudit(), servicer=CrashingProbeServicer())
    try:
        client = stub(ctx, server.port, tls_of(ctx, "cli"))
        correlation = f"it-{uuid.uuid4()}"
        labels = {"service": "accounts", "method": "/bastion.probe.v1.Probe/Whoami", "code": "INTERNAL"}
        before = REGISTRY.get_sample_value("bastion_grpc_refused_total", labels) or 0.0
        metadata = call_metadata(user_token(ctx, "alice")["access_token"], correlation)
        with structlog.testing.capture_logs() as logs, pytest.raises(grpc.RpcError) as failed:
            client.Whoami(probe_pb2.WhoamiRequest(), metadata=metadata, timeout=10)
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        assert failed.value.details() == f"internal error (correlation id {correlation})"
        for leak in (CrashingProbeServicer.SECRET, "RuntimeError", "Traceback", "crash"):
            assert leak not in failed.value.details()
            assert leak not in repr(failed.value.trailing_metadata())
        crashes = [entry for entry in logs if entry["event"] == "call_crashed"]
        assert [entry["correlation_id"] for entry in crashes] == [correlation], "logged, with the correlation id"
        assert REGISTRY.get_sample_value("bastion_grpc_refused_total", labels) == before + 1
    finally:
        server.stop()


def test_a_request_over_the_size_limit_is_refused_before_any_handler(ctx: StackContext, probe: ProbeServer) -> None:
    # A channel that sends anything: the kit's own client channels would refuse to send it in the first place.
    channel = grpc.secure_channel(f"localhost:{probe.port}", channel_credentials(tls_of(ctx, "cli")),
                                  options=[("grpc.max_send_message_length", -1)])
    whoami = channel.unary_unary("/bastion.probe.v1.Probe/Whoami", request_serializer=lambda raw: raw,
                                 response_deserializer=lambda raw: raw)
    token = call_metadata(user_token(ctx, "alice")["access_token"])
    with pytest.raises(grpc.RpcError) as refused:
        whoami(b"\x00" * (MAX_MESSAGE_BYTES + 1), metadata=token, timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(MAX_MESSAGE_BYTES) in refused.value.details(), refused.value.details()
    assert whoami(probe_pb2.WhoamiRequest().SerializeToString(), metadata=token, timeout=10) is not None
    channel.close()
