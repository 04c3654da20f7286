"""What the generated negative tests send: every kind of bad token, a caller for any RPC of any service, and the
status a refused call ends with."""

import base64
import hashlib
import hmac
import json
import ssl
import urllib.request
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from jwt.algorithms import RSAAlgorithm
from keycloak import KeycloakOpenID

from bastion.devstack.context import StackContext
from bastion.testing.tokens import TokenMinter
from tests.integration.grpc_harness import service_token, user_token


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def realm_public_pem(ctx: StackContext) -> tuple[str, bytes]:
    """The realm's RS256 key id and public key PEM, as anyone can read them from the JWKS endpoint."""
    context = ssl.create_default_context(cafile=str(ctx.ca_file))
    url = f"https://localhost:{ctx.settings.keycloak_port}/realms/bastion/protocol/openid-connect/certs"
    with urllib.request.urlopen(url, context=context, timeout=10) as response:
        jwks = json.load(response)
    key = next(k for k in jwks["keys"] if k.get("use") == "sig" and k.get("alg") == "RS256")
    public = RSAAlgorithm.from_jwk(json.dumps(key))
    return key["kid"], public.public_bytes(serialization.Encoding.PEM,  # type: ignore[union-attr]
                                           serialization.PublicFormat.SubjectPublicKeyInfo)


def forged_tokens(ctx: StackContext) -> dict[str, str]:
    """Every kind of bad token, built from real Keycloak tokens where the attack needs one."""
    real = user_token(ctx, "tina")
    header, payload, signature = real["access_token"].split(".")
    claims = json.loads(unb64(payload))
    kid, public_pem = realm_public_pem(ctx)
    confused_input = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT', 'kid': kid}).encode())}.{payload}"
    confused = b64(hmac.new(public_pem, confused_input.encode(), hashlib.sha256).digest())
    edited = dict(claims, realm_access={"roles": ["admin", "teller"]})
    minter = TokenMinter()
    forged_claims = {k: v for k, v in claims.items() if k not in ("exp", "iat")}
    master = KeycloakOpenID(server_url=f"https://localhost:{ctx.settings.keycloak_port}/", realm_name="master",
                            client_id="admin-cli", verify=str(ctx.ca_file)).token(
        "admin", ctx.credentials.keycloak_admin["admin"])["access_token"]
    return {
        "alg none": f"{b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{payload}.",
        "HS256 keyed with the realm public key": f"{confused_input}.{confused}",
        "edited payload": f"{header}.{b64(json.dumps(edited).encode())}.{signature}",
        "stripped signature": f"{header}.{payload}.",
        "audience of another service": service_token(ctx, "notifications"),
        "another issuer": master,
        "ID token": real["id_token"],
        "refresh token": real["refresh_token"],
        "key the realm never had": minter.mint(**forged_claims),
        "realm key id, foreign key": minter.mint(headers={"kid": kid}, **forged_claims),
        "garbage": "not-a-jwt",
    }


def generic_call(channel: grpc.Channel, service: ServiceDescriptor, method: MethodDescriptor) -> Any:
    """A caller of SERVICE's METHOD on CHANNEL that sends an empty request and returns the raw answer: refusals
    happen before any handler reads a request, so one caller fits every RPC."""
    path = f"/{service.full_name}/{method.name}"
    identity = {"request_serializer": lambda _: b"", "response_deserializer": lambda data: data}
    if method.server_streaming:
        stream = channel.unary_stream(path, **identity)
        return lambda **kwargs: list(stream(b"", **kwargs))
    unary = channel.unary_unary(path, **identity)
    return lambda **kwargs: unary(b"", **kwargs)


def code_of(call: Any) -> grpc.StatusCode:
    """The status CALL fails with; the test fails if it does not fail."""
    with pytest.raises(grpc.RpcError) as refused:
        call()
    return refused.value.code()  # type: ignore[no-any-return]
