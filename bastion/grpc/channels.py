"""Client channels: mutual TLS with a component's dev-CA certificate, and per-call metadata."""

import grpc

from bastion.grpc.context import CORRELATION_HEADER
from bastion.grpc.server import MAX_MESSAGE_BYTES, TlsFiles


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca.read_bytes(), private_key=tls.key.read_bytes(),
        certificate_chain=tls.cert.read_bytes(),
    )


def secure_channel(target: str, tls: TlsFiles) -> grpc.aio.Channel:
    """An asyncio channel to TARGET (host:port) that presents TLS's certificate and checks the server's."""
    return grpc.aio.secure_channel(
        target, channel_credentials(tls),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
    )


def call_metadata(token: str | None, correlation_id: str | None = None) -> tuple[tuple[str, str], ...]:
    metadata: list[tuple[str, str]] = []
    if token:
        metadata.append(("authorization", f"Bearer {token}"))
    if correlation_id:
        metadata.append((CORRELATION_HEADER, correlation_id))
    return tuple(metadata)
