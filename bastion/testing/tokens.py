"""A Keycloak-like token minter for unit tests: realistic access tokens, and the forgeries attackers try with them.

The forgeries are built by hand on purpose: PyJWT rightly refuses to produce them.
"""

import functools
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from jwt.algorithms import RSAAlgorithm
from jwt.utils import base64url_decode, base64url_encode

REALM_ISSUER = "https://localhost:8443/realms/bastion"
SigningKey = rsa.RSAPrivateKey | EllipticCurvePrivateKey


def _segment(value: dict[str, Any]) -> str:
    return base64url_encode(json.dumps(value, separators=(",", ":")).encode()).decode()


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class ManualClock:
    """A clock that moves only when told to; pass it to the validator, the JWKS cache and the minter."""

    def __init__(self, now: float = 1_790_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class TokenMinter:
    """Plays the realm: holds its RSA signing keys, publishes them as a JWKS, and mints tokens as Keycloak does."""

    def __init__(
        self,
        issuer: str = REALM_ISSUER,
        audience: str | list[str] = "accounts",
        client_id: str = "bastion-cli",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.client_id = client_id
        self._clock = clock
        self._keys: dict[str, rsa.RSAPrivateKey] = {}
        self.kid = self.rotate()

    @property
    def private_key(self) -> rsa.RSAPrivateKey:
        """The realm's active signing key."""
        return self._keys[self.kid]

    @functools.cached_property
    def foreign_key(self) -> rsa.RSAPrivateKey:
        """A key the realm never had: what an attacker signs with."""
        return _new_key()

    def rotate(self) -> str:
        """A new active key, as Keycloak's key rotation makes; earlier keys stay published until retired."""
        kid = uuid.uuid4().hex
        self._keys[kid] = _new_key()
        self.kid = kid
        return kid

    def retire(self, kid: str) -> None:
        del self._keys[kid]

    def jwks(self) -> dict[str, Any]:
        """The realm's certs document: every signing key, plus an encryption key that must never verify."""
        keys = [
            {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "use": "sig", "alg": "RS256"}
            for kid, key in self._keys.items()
        ]
        encryption = RSAAlgorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        keys.append({**encryption, "kid": f"{self.kid}-enc", "use": "enc", "alg": "RSA-OAEP"})
        return {"keys": keys}

    def claims(self, **overrides: Any) -> dict[str, Any]:
        """Keycloak's access-token claims for alice, as the realm issues them (bastion/devstack/realm.py); an
        override of None removes the claim."""
        now = int(self._clock())
        claims: dict[str, Any] = {
            "exp": now + 300,
            "iat": now,
            "jti": str(uuid.uuid4()),
            "iss": self.issuer,
            "aud": self.audience,
            "sub": str(uuid.uuid5(uuid.NAMESPACE_URL, "bastion:alice")),
            "typ": "Bearer",
            "azp": self.client_id,
            "sid": str(uuid.uuid4()),
            "realm_access": {"roles": ["customer"]},
            "scope": "openid",
            "preferred_username": "alice",
        }
        claims.update(overrides)
        return {name: value for name, value in claims.items() if value is not None}

    def mint(
        self,
        *,
        headers: dict[str, Any] | None = None,
        key: SigningKey | None = None,
        algorithm: str = "RS256",
        **claims: Any,
    ) -> str:
        """A signed token; the header names the active key id unless HEADERS says otherwise (None removes)."""
        header = {name: value for name, value in {"kid": self.kid, **(headers or {})}.items() if value is not None}
        return jwt.encode(self.claims(**claims), key or self.private_key, algorithm=algorithm, headers=header)

    def signed_as_is(self, header: dict[str, Any], **claims: Any) -> str:
        """A token with exactly HEADER (plus the active key id and RS256), validly signed by the realm key: for
        header members PyJWT itself would drop or rewrite when encoding (such as `b64: true`)."""
        header = {"alg": "RS256", "typ": "JWT", "kid": self.kid, **header}
        signing_input = f"{_segment(header)}.{_segment(self.claims(**claims))}"
        signature = self.private_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{base64url_encode(signature).decode()}"

    def alg_none(self, **claims: Any) -> str:
        """An unsigned token that declares `alg: none`."""
        header = {"alg": "none", "typ": "JWT", "kid": self.kid}
        return f"{_segment(header)}.{_segment(self.claims(**claims))}."

    def hs256_with_public_key(self, **claims: Any) -> str:
        """The key-confusion forgery: HMAC-SHA256 keyed with the realm's public key PEM, which anyone can read."""
        header = {"alg": "HS256", "typ": "JWT", "kid": self.kid}
        signing_input = f"{_segment(header)}.{_segment(self.claims(**claims))}"
        secret = self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{base64url_encode(signature).decode()}"

    @staticmethod
    def stripped_signature(token: str) -> str:
        header, payload, _ = token.split(".")
        return f"{header}.{payload}."

    @staticmethod
    def edited_payload(token: str, **changes: Any) -> str:
        """TOKEN with its claims changed and its original signature kept."""
        header, payload, signature = token.split(".")
        claims = json.loads(base64url_decode(payload))
        claims.update(changes)
        return f"{header}.{_segment(claims)}.{signature}"


class FakeJwksEndpoint:
    """Stands in for the realm's certs endpoint: serves the minter's JWKS, counts fetches, can be made to fail."""

    def __init__(self, minter: TokenMinter) -> None:
        self.minter = minter
        self.fetches = 0
        self.failing = False
        self.answering: threading.Event | None = None  # when set to an Event: a Keycloak that hangs until it is set

    def __call__(self) -> dict[str, Any]:
        self.fetches += 1
        if self.answering is not None:
            self.answering.wait(30)
        if self.failing:
            raise ConnectionError("the realm's certs endpoint is unreachable")
        return self.minter.jwks()
