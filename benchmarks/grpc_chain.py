"""Benchmark of the gRPC security chain: unary Whoami throughput and latency, bare vs mutual TLS vs the whole kit.

Run with `.venv/bin/python -m benchmarks.grpc_chain [--seconds S] [--concurrency N] [--rounds R] [--breakdown]
[--threads] [--profile] [--pin]` (uses the dev install in .state and starts it if it is not running; it is left
running). In the same run, for
`bastion.probe.v1.Probe/Whoami`:
  (a) bare: plaintext on 127.0.0.1 (this benchmark's baseline only), no interceptor, a servicer answering a
      fixed WhoamiResponse (the real one reads the interceptor's `current_call`);
  (b) mutual TLS only: the kit's server credentials (dev CA, client certificate required), no interceptor;
  (c) the whole chain: `start_server` with the SecurityInterceptor: Keycloak JWKS cache and TokenValidator
      with the token revocations read from the dev stack's identity.revocations.v1 as the services read them,
      method policy infra/policies/probe.yaml, Redis rate limiter (a limit that never triggers), signed access
      decisions to Kafka; alice's real access token on every call, the cli certificate on the client.
      The decisions go to a throw-away topic of this run (`bench.<uuid>.access.v1`, like access.decisions.v1),
      not to access.decisions.v1: there the dev stack's audit service would verify and store each of them in
      PostgreSQL while the benchmark runs (about 0.5 ms of CPU per decision, audit service and PostgreSQL
      together, measured 2026-11-27), on the same two cores: the chain would be measured against the audit
      pipeline downstream of it, which in a deployment runs elsewhere (bench-audit measures the audit log).

Each server runs in its own process (multiprocessing, spawn) with its own event loop; the client drives
CONCURRENCY calls in flight over one grpc.aio channel in this process. Calls completing within the measured
window (after the warm-up) count; the server's and the client's CPU time over that window is reported per call,
and "all CPU" adds the dev stack's components (Kafka's broker, Redis, ...): on this busy 2-core machine CPU per
call is steadier than calls/s, so a second ratio compares all CPU per call, bare over chain (median rounds).
The scenarios run in R alternated rounds and each shows its best round; the chain/bare ratio is also given
per round (each round's chain over the same round's bare, seconds apart) and their median, the figure least
moved by the machine's slow swings. Every median is an upper median: a measured value, for an even number of
rounds too. `--breakdown` adds the chain without
the Redis limiter, without the Kafka audit and without either, and mutual TLS with an interceptor that only
passes calls on, without and with the caller's bearer token on the wire, and with it one that reads only what every
call of the chain must read (metadata, the correlation id returned as trailing metadata, the peer's certificate
identity) and checks nothing: the floor of any chain built on grpc.aio this way, to attribute the chain's cost.
`--threads` prints the server's CPU per call by OS thread (event loop, gRPC's poller, librdkafka's, the audit
worker's), to see where CPU goes outside the event loop, and the dev stack's components' CPU per call over the
same window (Kafka's broker taking the access decisions, Redis answering the rate limiter).
`--pin` runs each server on the last CPU and the client on the others (the dev stack's processes are left where
they are), so client and server never take each other's core: steadier rounds.
`--profile` adds a run of the chain with cProfile on the server's event-loop thread (its figures are slowed
by the profiler and not compared) and prints where the server's time goes.
"""

import argparse
import asyncio
import contextvars
import cProfile
import io
import multiprocessing
import os
import pstats
import ssl
import statistics
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import psutil
import redis.asyncio as aioredis
from keycloak import KeycloakOpenID
from prometheus_client import REGISTRY

from bastion.access.v1.decision_pb2 import AccessDecision
from bastion.devstack.components.kafka import Kafka
from bastion.devstack.components.keycloak import Keycloak
from bastion.devstack.context import StackContext
from bastion.devstack.event_access import EventAccessPolicy, TopicPolicy, load_policy
from bastion.devstack.stack import Stack
from bastion.events.keys import KeyRing
from bastion.events.trust import load_trust_policy
from bastion.events.verify import EnvelopeVerifier
from bastion.grpc.audit import AccessAudit, KafkaAccessAudit
from bastion.grpc.channels import call_metadata, channel_credentials
from bastion.grpc.context import CORRELATION_HEADER, correlation_id_from, peer_identity_from
from bastion.grpc.names import server_name
from bastion.grpc.policy import load_method_policy
from bastion.grpc.ratelimit import RateLimit, RedisRateLimiter
from bastion.grpc.server import MAX_MESSAGE_BYTES, ServerSecurity, TlsFiles, server_credentials, start_server
from bastion.grpc.tokens import JwksCache, TokenValidator, jwks_url
from bastion.probe.v1 import probe_pb2, probe_pb2_grpc
from bastion.revocations.feed import TOPIC as REVOCATIONS_TOPIC
from bastion.revocations.feed import RevocationFeed
from bastion.revocations.revoked import RevokedTokens
from bastion.runtime import revoked_tokens
from bastion.settings import PROJECT_ROOT, DevstackSettings
from bastion.testing.probe import ProbeServicer

SERVICE = "accounts"  # the probe answers as the accounts service: alice's token names it in `aud`
USER = "alice"
HOST = "127.0.0.1"
TLS_NAME = server_name(SERVICE)  # the name only the service's certificate carries, as the kit's clients ask
SCENARIOS = {
    "bare": "(a) bare: plaintext, no interceptor",
    "mtls": "(b) mutual TLS only",
    "chain": "(c) whole chain (mTLS+JWT+policy+Redis+audit)",
}
# `--breakdown`: the chain without one or both of its remote parts, to attribute its cost.
BREAKDOWN = {
    "chain-no-limiter": "    chain without the Redis rate limiter",
    "chain-no-audit": "    chain without the Kafka access audit",
    "chain-local": "    chain without either (mTLS+JWT cache+policy)",
    "mtls-passthrough": "    mTLS + an interceptor that only passes calls on",
    "mtls-token": "    the same, the caller's bearer token sent as well",
    "mtls-reads": "    the same, reading what the chain must (no checks)",
}
AIM = 0.8
SERVER_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                  ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
TIMEOUT = 60.0
CALL_METADATA: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar("bench_call_metadata")


def bastion(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "bastion.cli", *args], check=True, capture_output=True)


def stack_context() -> StackContext:
    return Stack(DevstackSettings(), progress=lambda message: None).context()


def tls_of(ctx: StackContext, name: str) -> TlsFiles:
    paths = ctx.pki.paths(name)
    return TlsFiles(paths.cert, paths.key, ctx.ca_file)


def user_token(ctx: StackContext, user: str) -> str:
    client = KeycloakOpenID(server_url=f"https://localhost:{ctx.settings.keycloak_port}/", realm_name="bastion",
                            client_id="bastion-cli", verify=str(ctx.ca_file))
    token: str = client.token(user, ctx.credentials.users[user])["access_token"]
    return token


# --- the servers (module level, so that spawned processes can import them) ---


def register_probe(servicer: ProbeServicer, server: grpc.aio.Server) -> None:
    probe_pb2_grpc.add_ProbeServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]


class FixedProbeServicer(ProbeServicer):
    """The bare baseline: a Whoami of the chain's size that needs no interceptor."""

    def __init__(self) -> None:
        self.response = probe_pb2.WhoamiResponse(
            subject="5f0c6f1e-6a7b-4c1d-9e2f-0a1b2c3d4e5f", username=USER, client_id="bastion-cli",
            roles=["customer", "default-roles-bastion", "offline_access", "uma_authorization"],
            peer_identity="cli", correlation_id="8a6e0f5c-2b1d-4e3f-9a7b-6c5d4e3f2a1b",
            trace_id="4bf92f3577b34da6a3ce929d0e0e4736", span_id="00f067aa0ba902b7",  # as the chain's new traces
        )

    async def Whoami(self, request: probe_pb2.WhoamiRequest, context: grpc.aio.ServicerContext
                     ) -> probe_pb2.WhoamiResponse:
        return self.response


class NoAudit:
    """`--breakdown` only: decisions dropped, to measure the chain without signing and producing them."""

    def record(self, decision: AccessDecision) -> None:
        pass


class CountingAccessAudit(KafkaAccessAudit):
    """KafkaAccessAudit that also counts what it queued. It hears from the broker about failures only (counted as
    lost), so after a flush that leaves nothing, every decision queued and not lost was acknowledged."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queued = 0

    def record(self, decision: AccessDecision) -> None:
        super().record(decision)
        self.queued += 1


async def _bare_server() -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    register_probe(FixedProbeServicer(), server)
    port: int = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    return server, port


async def _mtls_server(ctx: StackContext) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    register_probe(FixedProbeServicer(), server)
    port: int = server.add_secure_port(f"{HOST}:0", server_credentials(tls_of(ctx, SERVICE)))
    await server.start()
    return server, port


class PassThrough(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """`--breakdown` only: the least any grpc.aio interceptor that wraps handlers costs (one wrapper per method,
    built once, awaiting the handler), to tell grpc.aio's own price from the chain's work."""

    def __init__(self) -> None:
        self.wrapped: dict[str, Any] = {}

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        wrapped = self.wrapped.get(details.method)
        if wrapped is None:
            wrapped = self.wrapped[details.method] = grpc.unary_unary_rpc_method_handler(
                self.wrap(handler), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return wrapped

    def wrap(self, handler: Any) -> Any:
        inner = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await inner(request, context)

        return unary


class ReadsOnly(PassThrough):
    """`--breakdown` only: what every call of the chain must do before any check, and nothing else: the metadata
    (as grpc.aio hands it to interceptors), the correlation id returned in the trailing metadata, the peer's
    identity from its certificate. The floor of any chain built this way on grpc.aio."""

    def wrap(self, handler: Any) -> Any:
        inner = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            metadata = {key: value for key, value in CALL_METADATA.get() if isinstance(value, str)}
            context.set_trailing_metadata(((CORRELATION_HEADER, correlation_id_from(metadata)),))
            if peer_identity_from(context.peer_identity_key(), context.peer_identities()) is None:
                raise SystemExit("the client certificate has no Bastion identity")
            return await inner(request, context)

        return unary

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        CALL_METADATA.set(details.invocation_metadata or ())
        return await super().intercept_service(continuation, details)


async def _passthrough_server(ctx: StackContext, interceptor: PassThrough) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[interceptor])
    register_probe(FixedProbeServicer(), server)
    port: int = server.add_secure_port(f"{HOST}:0", server_credentials(tls_of(ctx, SERVICE)))
    await server.start()
    return server, port


async def _chain_server(ctx: StackContext, audit: AccessAudit, limited: bool
                        ) -> tuple[grpc.aio.Server, int, JwksCache]:
    keycloak = Keycloak(ctx)
    jwks = JwksCache.from_url(jwks_url(keycloak.issuer), ssl.create_default_context(cafile=str(ctx.ca_file)))
    jwks.start_background_refresh()
    validator = TokenValidator(keycloak.issuer, SERVICE, jwks, revocations=_revocations_read(ctx))
    redis = aioredis.Redis(**ctx.redis_options(SERVICE, ctx.credentials.redis[SERVICE]))
    limiter = RedisRateLimiter(redis, SERVICE, RateLimit(10**9, 60)) if limited else None
    policy = load_method_policy(PROJECT_ROOT / "infra" / "policies" / "probe.yaml")
    security = ServerSecurity(SERVICE, tls_of(ctx, SERVICE), validator, policy, audit, limiter)
    server, port = await start_server(
        security, lambda s: register_probe(ProbeServicer(), s),
        [probe_pb2.DESCRIPTOR.services_by_name["Probe"]], host=HOST,
    )
    return server, port, jwks


def _revocations_read(ctx: StackContext) -> RevokedTokens:
    """The token revocations as the services read them: the dev stack's identity.revocations.v1, read by a feed of
    this process under the service's witness group (partitions assigned, nothing committed, so the running service
    is not disturbed), checked on every call as in the services."""
    infra = ctx.settings.infra_dir
    access = load_policy(infra / "event-access.yaml", set(ctx.service_names))
    verifier = EnvelopeVerifier(KeyRing(ctx.layout.event_keys_dir).followed_trust_store(),
                                load_trust_policy(infra / "event-trust.yaml", access))
    revoked = revoked_tokens(ctx)
    feed = RevocationFeed(SERVICE, Kafka(ctx).client_config(SERVICE, ctx.credentials.kafka[SERVICE]),
                          access.topics[REVOCATIONS_TOPIC].witnesses[SERVICE], verifier, revoked, revoked.keep_seconds)
    threading.Thread(target=feed.run, args=(threading.Event(),), name="revocations", daemon=True).start()
    deadline = time.monotonic() + 30
    while not revoked.is_current():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{REVOCATIONS_TOPIC} was not read to its end, or the realm's watch (the dev "
                               "stack's audit service) not heard from, within 30 s")
        time.sleep(0.1)
    return revoked


def audit_topic_access(topic: str) -> EventAccessPolicy:
    """The benchmark's own audit topic: like access.decisions.v1 (3 partitions, LogAppendTime), written by the
    service the probe answers as, read by nobody."""
    config = {"message.timestamp.type": "LogAppendTime"}
    return EventAccessPolicy({topic: TopicPolicy(topic, 3, (SERVICE,), {}, config)})


async def _serve(mode: str, profile: bool, audit_topic: str, conn: Connection) -> None:
    ctx = stack_context()
    audit: CountingAccessAudit | None = None
    jwks: JwksCache | None = None
    if mode == "bare":
        server, port = await _bare_server()
    elif mode == "mtls":
        server, port = await _mtls_server(ctx)
    elif mode in ("mtls-passthrough", "mtls-token"):
        server, port = await _passthrough_server(ctx, PassThrough())
    elif mode == "mtls-reads":
        server, port = await _passthrough_server(ctx, ReadsOnly())
    elif mode in ("chain", "chain-no-limiter"):
        key = KeyRing(ctx.layout.event_keys_dir).signing_key(SERVICE)
        audit = CountingAccessAudit(key, Kafka(ctx).client_config(SERVICE, ctx.credentials.kafka[SERVICE]),
                                    topic=audit_topic)
        audit.producer.list_topics(audit_topic, timeout=30)  # connection and SASL before any call
        server, port, jwks = await _chain_server(ctx, audit, limited=mode == "chain")
    else:
        server, port, jwks = await _chain_server(ctx, NoAudit(), limited=mode == "chain-no-audit")
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()  # this (the event loop's) thread only: where the server's Python time goes
    conn.send(("ready", port))
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # the client says stop
    if profiler is not None:
        profiler.disable()
    await server.stop(1)
    stats: dict[str, int] = {}
    if audit is not None:
        remaining = audit.flush(TIMEOUT)
        audit.producer.poll(0)
        lost = int(REGISTRY.get_sample_value("bastion_access_decisions_lost_total", {"service": SERVICE}) or 0)
        delivered = audit.queued - lost if remaining == 0 else 0
        stats = {"queued": audit.queued, "delivered": delivered, "failed": lost, "remaining": remaining}
    if jwks is not None:
        jwks.stop()
    conn.send(("stopped", stats, _profile_report(profiler) if profiler is not None else ""))


def pin_client(pin: bool) -> set[int] | None:
    """With PIN, keep this (the client's) process off the last CPU and return that CPU, for the servers: the client
    then never takes the server's core, which steadies the figures (the rounds of a scenario agree within a few
    percent instead of a third, 2026-11-29)."""
    if not pin:
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit(f"--pin needs at least two CPUs; this process may use {len(cpus)}")
    os.sched_setaffinity(0, cpus[:-1])
    return {cpus[-1]}


def pinned(server_cpus: set[int] | None) -> str:
    if server_cpus is None:
        return ""
    server = ", ".join(map(str, sorted(server_cpus)))
    client = ", ".join(map(str, sorted(os.sched_getaffinity(0))))
    return f" (pinned: server on CPU {server}, client on {client})"


def serve(mode: str, profile: bool, audit_topic: str, conn: Connection, cpus: set[int] | None = None) -> None:
    if cpus is not None:
        os.sched_setaffinity(0, cpus)  # before any thread starts: gRPC's and librdkafka's threads inherit it
    try:
        asyncio.run(_serve(mode, profile, audit_topic, conn))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise


def _profile_report(profiler: cProfile.Profile) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.strip_dirs().sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(r"interceptor|tokens|ratelimit|audit|envelopes|signing|probe", 25)
    return out.getvalue()


# --- the client ---


@dataclass(frozen=True)
class Figures:
    calls: int
    seconds: float
    p50_ms: float
    p99_ms: float
    server_cpu: float  # CPU seconds of the server process over the measured window
    client_cpu: float
    server_threads: dict[str, float]  # the server's CPU seconds over the window by thread (name: tid)
    stack_cpu: dict[str, float]  # CPU seconds over the window of the dev stack's components (kafka, redis, ...)

    @property
    def rate(self) -> float:
        return self.calls / self.seconds

    @property
    def machine_cpu_per_call(self) -> float:
        """CPU seconds per call of every process involved: server, client and the dev stack's components. On a
        saturated machine this is what sets the rate, and it varies far less from round to round than calls/s."""
        return (self.server_cpu + self.client_cpu + sum(self.stack_cpu.values())) / self.calls


def percentile(sorted_values: list[float], fraction: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def stack_processes(ctx: StackContext) -> dict[str, psutil.Process]:
    """The dev stack's running components (Kafka's broker, Redis, Keycloak, PostgreSQL), by name: they share the
    two cores with the benchmark, so their CPU per call is part of what a scenario costs the machine."""
    found = {}
    for pid_file in sorted(ctx.layout.run_dir.glob("*.pid")):
        try:
            found[pid_file.stem] = psutil.Process(int(pid_file.read_text().split()[0]))
        except (OSError, ValueError, IndexError, psutil.Error):
            continue
    return found


def group_cpu(processes: dict[str, psutil.Process]) -> dict[str, float]:
    """CPU seconds so far of each component, its child processes included (PostgreSQL's backends)."""
    seconds = {}
    for name, process in processes.items():
        try:
            members = [process, *process.children(recursive=True)]
        except psutil.Error:
            continue
        total = 0.0
        for member in members:
            try:
                total += cpu_seconds(member)
            except psutil.Error:
                continue
        seconds[name] = total
    return seconds


def thread_cpu(process: psutil.Process) -> dict[str, float]:
    """CPU seconds so far of each thread of PROCESS, by 'name:tid' (the OS name: librdkafka and gRPC name
    theirs; Python threads show as python, the main thread's tid is the pid)."""
    seconds = {}
    for thread in process.threads():
        try:
            name = Path(f"/proc/{process.pid}/task/{thread.id}/comm").read_text().strip()
        except OSError:
            continue
        seconds[f"{name}:{thread.id}"] = thread.user_time + thread.system_time
    return seconds


async def drive(port: int, credentials: grpc.ChannelCredentials | None, metadata: tuple[tuple[str, str], ...],
                server: psutil.Process, stack: dict[str, psutil.Process], concurrency: int, warmup: float,
                seconds: float) -> Figures:
    target = f"{HOST}:{port}"
    if credentials is None:
        channel = grpc.aio.insecure_channel(target)
    else:
        channel = grpc.aio.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", TLS_NAME)])
    me = psutil.Process()
    async with channel:
        stub = probe_pb2_grpc.ProbeStub(channel)  # type: ignore[no-untyped-call]
        answer = await stub.Whoami(probe_pb2.WhoamiRequest(), metadata=metadata, timeout=TIMEOUT)
        if answer.username != USER:
            raise SystemExit(f"Whoami answered {answer.username!r}, not {USER!r}")
        latencies: list[float] = []
        cpu: dict[str, float] = {}
        threads: dict[str, float] = {}
        components: dict[str, float] = {}
        start = time.perf_counter()
        window_from, window_to = start + warmup, start + warmup + seconds

        async def worker() -> None:
            request = probe_pb2.WhoamiRequest()
            while True:
                sent = time.perf_counter()
                if sent >= window_to:
                    return
                await stub.Whoami(request, metadata=metadata, timeout=TIMEOUT)
                done = time.perf_counter()
                if window_from <= done < window_to:
                    latencies.append(done - sent)

        async def sample() -> None:
            await asyncio.sleep(window_from - time.perf_counter())
            cpu["server"], cpu["client"] = -cpu_seconds(server), -cpu_seconds(me)
            before, stack_before = thread_cpu(server), group_cpu(stack)
            await asyncio.sleep(window_to - time.perf_counter())
            cpu["server"] += cpu_seconds(server)
            cpu["client"] += cpu_seconds(me)
            threads.update({name: used - before.get(name, 0.0) for name, used in thread_cpu(server).items()})
            components.update({name: used - stack_before[name] for name, used in group_cpu(stack).items()
                               if name in stack_before})

        await asyncio.gather(sample(), *(worker() for _ in range(concurrency)))
    latencies.sort()
    return Figures(len(latencies), seconds, percentile(latencies, 0.5) * 1e3, percentile(latencies, 0.99) * 1e3,
                   cpu["server"], cpu["client"], threads, components)


def run(mode: str, options: argparse.Namespace, ctx: StackContext, audit_topic: str,
        profile: bool = False, server_cpus: set[int] | None = None) -> tuple[Figures, dict[str, int], str]:
    spawn = multiprocessing.get_context("spawn")
    ours, theirs = spawn.Pipe()
    process = spawn.Process(target=serve, args=(mode, profile, audit_topic, theirs, server_cpus),
                            name=f"grpc-{mode}", daemon=True)
    process.start()
    try:
        if not ours.poll(TIMEOUT):
            raise SystemExit(f"the {mode} server did not start within {TIMEOUT:.0f}s")
        message = ours.recv()
        if message[0] != "ready":
            raise SystemExit(f"the {mode} server failed:\n{message[1]}")
        port: int = message[1]
        credentials = None if mode == "bare" else channel_credentials(tls_of(ctx, "cli"))
        # A fresh token for each run: the realm's access tokens live 5 minutes, less than a run of many rounds.
        token = user_token(ctx, USER)
        metadata = call_metadata(token) if mode.startswith("chain") or mode in ("mtls-token", "mtls-reads") else ()
        figures = asyncio.run(drive(port, credentials, metadata, psutil.Process(process.pid), stack_processes(ctx),
                                    options.concurrency, options.warmup, options.seconds))
        ours.send("stop")
        if not ours.poll(TIMEOUT):
            raise SystemExit(f"the {mode} server did not stop within {TIMEOUT:.0f}s")
        message = ours.recv()
        if message[0] != "stopped":
            raise SystemExit(f"the {mode} server failed:\n{message[1]}")
        return figures, message[1], message[2]
    finally:
        process.join(TIMEOUT)
        if process.is_alive():
            process.kill()


def row(label: str, figures: Figures) -> str:
    per_call = 1e6 / figures.calls
    return (f"  {label:<48}{figures.rate:>9,.0f}{figures.p50_ms:>9.2f}{figures.p99_ms:>9.2f}"
            f"{figures.server_cpu * per_call:>13.0f}{figures.client_cpu * per_call:>13.0f}"
            f"{figures.machine_cpu_per_call * 1e6:>13.0f}{figures.server_cpu / figures.seconds:>9.0%}")


def print_cpu_by_part(title: str, labels: dict[str, str], best: dict[str, Figures],
                      parts: Callable[[Figures], dict[str, float]]) -> None:
    """Each scenario's CPU per call by part (a thread, a dev-stack component), largest first, from its best round."""
    print(f"\n{title}")
    for mode, label in labels.items():
        figures = best[mode]
        used = sorted(((seconds * 1e6 / figures.calls, name) for name, seconds in parts(figures).items()), reverse=True)
        print(f"  {label.strip():<48}" + "  ".join(f"{name} {micros:.0f}" for micros, name in used if micros >= 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per scenario (default 5)")
    parser.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds first (default 1.5)")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight (default 32)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of the scenarios, alternated; each scenario's best round is shown (default 3)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also the chain without the rate limiter, without the audit, without either, and "
                             "mTLS with an interceptor that does nothing, without and with a bearer token sent")
    parser.add_argument("--threads", action="store_true",
                        help="also print each scenario's server CPU per call by thread (best round)")
    parser.add_argument("--profile", action="store_true",
                        help="then profile the chain's server (cProfile, event-loop thread) in an extra run")
    parser.add_argument("--pin", action="store_true",
                        help="run the server on the last CPU and the client on the others (the dev stack anywhere)")
    options = parser.parse_args()

    bastion("up")
    # Pinned only once the dev stack runs: the processes `bastion up` starts inherit this one's CPUs, and would keep
    # them for as long as they run.
    server_cpus = pin_client(options.pin)
    ctx = stack_context()
    labels = {**SCENARIOS, **(BREAKDOWN if options.breakdown else {})}
    rounds: dict[str, list[Figures]] = {mode: [] for mode in labels}
    audit = {"queued": 0, "delivered": 0, "failed": 0, "remaining": 0}
    admin = Kafka(ctx).admin()
    audit_topic = f"bench.{uuid.uuid4().hex}.access.v1"
    access = audit_topic_access(audit_topic)
    try:
        admin.ensure_topics(access)
        admin.grant(access.grants())
        for _ in range(options.rounds):
            for mode in labels:
                figures, stats, _ = run(mode, options, ctx, audit_topic, server_cpus=server_cpus)
                rounds[mode].append(figures)
                if mode == "chain":
                    audit = {name: audit[name] + stats[name] for name in audit}
        profiled = (run("chain", options, ctx, audit_topic, profile=True, server_cpus=server_cpus)
                    if options.profile else None)
    finally:
        admin.revoke(access.grants())
        for future in admin.client.delete_topics([audit_topic], operation_timeout=30).values():
            future.result()
    best = {mode: max(figures, key=lambda f: f.rate) for mode, figures in rounds.items()}

    print(f"gRPC unary {probe_pb2.DESCRIPTOR.services_by_name['Probe'].full_name}/Whoami, {options.concurrency} "
          f"calls in flight over one grpc.aio channel, {options.warmup:g} s warm-up + {options.seconds:g} s measured, "
          f"best of {options.rounds} alternated rounds; server in its own process (spawn), client in this one; "
          f"{os.cpu_count()} CPUs{pinned(server_cpus)}; CPU per call over the measured window, srv CPU = server's "
          "share of one core")
    print(f"  {'scenario':<48}{'calls/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'srv CPU µs':>13}{'cli CPU µs':>13}"
          f"{'all CPU µs':>13}{'srv CPU':>9}   calls/s of each round")
    for mode, label in labels.items():
        print(f"{row(label, best[mode])}   {' '.join(f'{f.rate:,.0f}' for f in rounds[mode])}")
    bare, mtls, chain = (best[mode].rate for mode in SCENARIOS)
    print(f"  {'ratio mTLS/bare':<48}{mtls / bare:>9.2f}")
    verdict = "met" if chain / bare >= AIM else "NOT met"
    print(f"  {'ratio chain/bare':<48}{chain / bare:>9.2f}  (aim: >= {AIM}: {verdict})")
    median_rate = {mode: statistics.median_high(f.rate for f in rounds[mode]) for mode in SCENARIOS}
    print(f"  {'ratio chain/bare (median rounds)':<48}{median_rate['chain'] / median_rate['bare']:>9.2f}"
          f"  ({median_rate['chain']:,.0f} against {median_rate['bare']:,.0f} calls/s)")
    # Each round runs every scenario back to back, so a round's chain/bare compares two runs seconds apart: the
    # pairs cancel the machine's slow swings (other tenants, the dev stack's JVMs), which best and median rounds
    # taken apart do not.
    paired = sorted(c.rate / b.rate for b, c in zip(rounds["bare"], rounds["chain"], strict=True))
    print(f"  {'ratio chain/bare, paired by round (median)':<48}{statistics.median_high(paired):>9.2f}"
          f"  (each round's, sorted: {' '.join(f'{ratio:.2f}' for ratio in paired)})")
    # The steadier view of the same question: all CPU per call, bare over chain (the rate each would reach on a
    # saturated machine), from each scenario's median round by that measure.
    steady = {mode: statistics.median_high(f.machine_cpu_per_call for f in rounds[mode]) for mode in SCENARIOS}
    print(f"  {'ratio of all CPU per call bare/chain (median)':<48}{steady['bare'] / steady['chain']:>9.2f}"
          f"  ({steady['bare'] * 1e6:.0f} against {steady['chain'] * 1e6:.0f} µs)")
    print(f"  access decisions of the chain runs (warm-up included): queued {audit['queued']:,}, delivered "
          f"{audit['delivered']:,}, failed {audit['failed']}, still queued after flush {audit['remaining']}")
    if options.threads:
        print_cpu_by_part("server CPU µs per call by thread (threads under 2 µs left out):", labels, best,
                          lambda figures: figures.server_threads)
        print_cpu_by_part("dev stack's CPU µs per call over the same window (components under 2 µs left out):",
                          labels, best, lambda figures: figures.stack_cpu)

    if profiled is not None:
        figures, _, report = profiled
        print(f"\nchain under cProfile (server event-loop thread; slowed, not comparable): {figures.rate:,.0f} calls/s,"
              f" {figures.calls:,} calls measured")
        print(report)


if __name__ == "__main__":
    main()
