"""Client channels: mutual TLS with a component's dev-CA certificate, the server checked to be the service called,
and per-call metadata."""

import grpc

from bastion.grpc.context import CORRELATION_HEADER
from bastion.grpc.names import server_name
from bastion.grpc.server import MAX_MESSAGE_BYTES, TlsFiles


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca.read_bytes(), private_key=tls.key.read_bytes(),
        certificate_chain=tls.cert.read_bytes(),
    )


def channel_options(service: str) -> list[tuple[str, str | int]]:
    """The options of a channel to SERVICE: its server must present SERVICE's own certificate (`server_name`), not
    merely one of the dev CA for the address called; messages up to the servers' cap."""
    return [("grpc.ssl_target_name_override", server_name(service)),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


def secure_channel(target: str, tls: TlsFiles, service: str) -> grpc.aio.Channel:
    """An asyncio channel to SERVICE at TARGET (host:port) that presents TLS's certificate and accepts only
    SERVICE's."""
    return grpc.aio.secure_channel(target, channel_credentials(tls), options=channel_options(service))


def blocking_channel(target: str, tls: TlsFiles, service: str) -> grpc.Channel:
    """The same as `secure_channel`, for blocking callers (the CLI, the demo, the labs)."""
    return grpc.secure_channel(target, channel_credentials(tls), options=channel_options(service))


def call_metadata(token: str | None, correlation_id: str | None = None) -> tuple[tuple[str, str], ...]:
    metadata: list[tuple[str, str]] = []
    if token:
        metadata.append(("authorization", f"Bearer {token}"))
    if correlation_id:
        metadata.append((CORRELATION_HEADER, correlation_id))
    return tuple(metadata)
