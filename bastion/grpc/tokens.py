"""Local validation of Keycloak access tokens: the realm's signing keys in a rate-limited cache, and a validator
whose every refusal carries a short machine reason and a message that never repeats the token.
"""

import hashlib
import math
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol
from urllib.parse import urlparse

import jwt
import structlog

log = structlog.get_logger(__name__)

Clock = Callable[[], float]
JwksFetch = Callable[[], Mapping[str, Any]]


class RevocationCheck(Protocol):
    """Refuses (AuthenticationError) a verified token whose access was revoked since it was issued."""

    def check(self, principal: "Principal") -> None: ...

# Asymmetric only: an HMAC algorithm would turn a published public key into a shared secret.
SUPPORTED_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"})
# Headers that would let the token choose its own key or oblige us to understand an extension.
REFUSED_HEADERS = frozenset({"jku", "x5u", "x5c", "jwk", "crit", "b64"})
# `preferred_username` names the principal in every service (owners, audit records): a token without it would fall
# back to its client id, which every user of one client shares.
REQUIRED_CLAIMS = ("exp", "iat", "iss", "sub", "azp", "preferred_username")
ACCESS_TOKEN_TYPE = "Bearer"  # noqa: S105 - the `typ` claim of an access token, not a password
SIGNING_KEY_TYPES = frozenset({"RSA", "EC"})


def jwks_url(issuer: str) -> str:
    """Where a Keycloak realm publishes its keys, given the realm's issuer URL."""
    return f"{issuer.rstrip('/')}/protocol/openid-connect/certs"


class AuthReason(StrEnum):
    MISSING = "missing"
    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    BAD_ALGORITHM = "bad_algorithm"
    UNTRUSTED_HEADER = "untrusted_header"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    WRONG_ISSUER = "wrong_issuer"
    WRONG_AUDIENCE = "wrong_audience"
    NOT_AN_ACCESS_TOKEN = "not_an_access_token"  # noqa: S105 - a reason code, not a password
    UNKNOWN_KEY = "unknown_key"
    KEYS_UNAVAILABLE = "keys_unavailable"
    REVOKED = "revoked"
    REVOCATIONS_UNAVAILABLE = "revocations_unavailable"


class AuthenticationError(Exception):
    """A token was refused. The message names the problem; it never contains the token or a key."""

    def __init__(self, reason: AuthReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Principal:
    """Who a verified access token speaks for."""

    subject: str
    username: str | None
    client_id: str
    roles: frozenset[str]
    token_id: str | None
    expires_at: int
    # The token's `iat`: a revocation (bastion/revocations) ends the tokens issued at or before it. 0 when unknown,
    # which any revocation of the subject covers.
    issued_at: int = 0
    # The token's `sid`, the Keycloak session it was issued in: a session that ended ends its tokens.
    session_id: str | None = None

    @property
    def is_service_account(self) -> bool:
        return self.username is not None and self.username.startswith("service-account-")


def signing_keys(document: Mapping[str, Any]) -> dict[str, jwt.PyJWK]:
    """The RSA and EC signature keys of a JWKS document, by key id; encryption and symmetric keys are dropped."""
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise ValueError("the JWKS document has no `keys` list")
    keys: dict[str, jwt.PyJWK] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("kty") not in SIGNING_KEY_TYPES:
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or entry.get("use", "sig") != "sig":
            continue
        try:
            keys[kid] = jwt.PyJWK(entry)
        except jwt.PyJWTError:
            continue
    if not keys:
        raise ValueError("the JWKS document holds no usable signing key")
    return keys


class KeysMustBeFetchedError(Exception):
    """The token cannot be judged before the realm's keys are fetched: ask again where blocking is fine (a worker
    thread). No verdict on the token, so never a refusal of it."""


@dataclass(frozen=True)
class _KeySet:
    keys: Mapping[str, jwt.PyJWK]
    fetched_at: float


class JwksCache:
    """The realm's signing keys, refreshed every `refresh_interval` seconds and, for an unknown key id, at most
    once per `min_refresh_gap`. Keys older than `max_staleness` that cannot be refreshed fail every validation.
    """

    def __init__(
        self,
        fetch: JwksFetch,
        *,
        refresh_interval: float = 300.0,
        min_refresh_gap: float = 30.0,
        max_staleness: float = 3600.0,
        clock: Clock = time.monotonic,
    ) -> None:
        if not 0 < refresh_interval <= max_staleness:
            raise ValueError("refresh_interval must be positive and no longer than max_staleness")
        if min_refresh_gap < 0:
            raise ValueError("min_refresh_gap must not be negative")
        self._fetch = fetch
        self._refresh_interval = refresh_interval
        self._min_refresh_gap = min_refresh_gap
        self._max_staleness = max_staleness
        self._clock = clock
        self._keys: _KeySet | None = None
        self._last_attempt: float | None = None
        self._fetch_underway = False
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_url(
        cls,
        url: str,
        ssl_context: ssl.SSLContext,
        *,
        timeout: float = 5.0,
        refresh_interval: float = 300.0,
        min_refresh_gap: float = 30.0,
        max_staleness: float = 3600.0,
    ) -> "JwksCache":
        """Keys fetched from URL over HTTPS, trusting what SSL_CONTEXT trusts; redirects are not followed."""
        if urlparse(url).scheme != "https":
            raise ValueError(f"the JWKS URL must use https: {url}")
        client = jwt.PyJWKClient(url, cache_jwk_set=False, timeout=timeout, ssl_context=ssl_context)

        def fetch() -> Mapping[str, Any]:
            document: Mapping[str, Any] = client.fetch_data()
            return document

        return cls(fetch, refresh_interval=refresh_interval, min_refresh_gap=min_refresh_gap,
                   max_staleness=max_staleness)

    def signing_key(self, kid: str, may_fetch: bool = True) -> jwt.PyJWK:
        """The realm key named KID; raises `unknown_key` or `keys_unavailable`. Without MAY_FETCH (an event loop,
        which a slow Keycloak must not stall), raises KeysMustBeFetchedError where it would fetch the keys first
        (or wait for the background refresh fetching them), and never takes the lock a fetch holds."""
        current = self._keys
        if current is None or self._clock() - current.fetched_at >= self._refresh_interval:
            # Keys due but still usable are used while another fetch is under way; no keys at all are waited for.
            current = self._refreshed(may_fetch, wait_for_fetch_underway=current is None)
        if current is None or self._clock() - current.fetched_at > self._max_staleness:
            raise AuthenticationError(AuthReason.KEYS_UNAVAILABLE, "the realm's signing keys could not be fetched")
        key = current.keys.get(kid)
        if key is None:
            # A fetch under way may be the one bringing this key (a rotation): waited for, not refused meanwhile.
            refreshed = self._refreshed(may_fetch, wait_for_fetch_underway=True)
            key = refreshed.keys.get(kid) if refreshed is not None else None
        if key is None:
            raise AuthenticationError(AuthReason.UNKNOWN_KEY, "the token names a key the realm does not publish")
        return key

    def start_background_refresh(self) -> None:
        """Refresh the keys on a daemon thread, so requests rarely wait for Keycloak."""
        if self._thread is not None:
            raise RuntimeError("the background refresh is already running")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._refresh_loop, name="jwks-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _refresh_loop(self) -> None:
        while True:
            current = self._keys
            if current is None or self._clock() - current.fetched_at >= self._refresh_interval:
                current = self._refresh()
            if current is None or self._clock() - current.fetched_at >= self._refresh_interval:
                # Failed or held back by the gap: retry later, never in a tight loop against a down Keycloak.
                wait = max(self._min_refresh_gap, 1.0)
            else:
                wait = self._refresh_interval - (self._clock() - current.fetched_at)
            if self._stopping.wait(wait):
                return

    def _refreshed(self, may_fetch: bool, wait_for_fetch_underway: bool) -> _KeySet | None:
        if may_fetch:
            return self._refresh()
        # Read without the lock, which a fetch in progress holds.
        last = self._last_attempt
        if last is None or self._clock() - last >= self._min_refresh_gap or (
                wait_for_fetch_underway and self._fetch_underway):
            raise KeysMustBeFetchedError
        return self._keys

    def _refresh(self) -> _KeySet | None:
        """Fetch the keys unless an attempt, failed or not, happened less than `min_refresh_gap` ago."""
        with self._lock:
            now = self._clock()
            if self._last_attempt is not None and now - self._last_attempt < self._min_refresh_gap:
                return self._keys
            # Said before the attempt's time, cleared after the keys: a check reading without the lock never
            # sees a fresh attempt without seeing it under way, nor the end of a fetch without its keys.
            self._fetch_underway = True
            self._last_attempt = now
            try:
                keys = signing_keys(self._fetch())
            # Whatever the fetch raises (network, TLS, JSON, an empty set), the cached keys stay in use.
            except Exception as error:
                self._log_failure(error, now)
                return self._keys
            else:
                self._keys = _KeySet(keys, now)
                return self._keys
            finally:
                self._fetch_underway = False

    def _log_failure(self, error: Exception, now: float) -> None:
        failure = f"{type(error).__name__}: {error}"
        if self._keys is not None and now - self._keys.fetched_at <= self._max_staleness:
            log.warning("jwks_refresh_failed_using_cached_keys", error=failure,
                        age_seconds=round(now - self._keys.fetched_at))
        else:
            log.error("jwks_refresh_failed_no_usable_keys", error=failure)


@dataclass(frozen=True)
class _Verified:
    principal: Principal
    kid: str


class _VerifiedTokens:
    """A bounded LRU of verified tokens, keyed by the SHA-256 of the token so the cache holds no bearer secrets."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[bytes, _Verified] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, digest: bytes) -> _Verified | None:
        with self._lock:
            entry = self._entries.get(digest)
            if entry is not None:
                self._entries.move_to_end(digest)
            return entry

    def put(self, digest: bytes, entry: _Verified) -> None:
        with self._lock:
            self._entries[digest] = entry
            self._entries.move_to_end(digest)
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)

    def discard(self, digest: bytes) -> None:
        with self._lock:
            self._entries.pop(digest, None)


_PYJWT_REASONS: tuple[tuple[type[jwt.PyJWTError], AuthReason, str], ...] = (
    (jwt.InvalidAlgorithmError, AuthReason.BAD_ALGORITHM, "the token's algorithm does not match the realm key"),
    (jwt.InvalidSignatureError, AuthReason.BAD_SIGNATURE, "the signature does not verify with the realm key"),
    (jwt.InvalidKeyError, AuthReason.UNKNOWN_KEY, "the realm key is too weak to trust"),
    (jwt.InvalidIssuerError, AuthReason.WRONG_ISSUER, "the token was issued by another issuer"),
    (jwt.InvalidAudienceError, AuthReason.WRONG_AUDIENCE, "the token is not meant for this service"),
)


class TokenValidator:
    """Validates Keycloak access tokens for one service (AUDIENCE) of one realm (ISSUER) without calling Keycloak.

    `verifications` counts signature checks; a token already verified is served from a bounded cache until it
    expires, so the hot path skips the RSA work but not the expiry check.
    """

    def __init__(
        self,
        issuer: str,
        audience: str,
        jwks: JwksCache,
        algorithms: tuple[str, ...] = ("RS256",),
        leeway_seconds: int = 30,
        max_token_bytes: int = 8192,
        clock: Clock = time.time,
        cache_size: int = 4096,
        revocations: RevocationCheck | None = None,
    ) -> None:
        if not issuer or not audience:
            raise ValueError("the issuer and the audience must be named")
        unsupported = set(algorithms) - SUPPORTED_ALGORITHMS
        if not algorithms or unsupported:
            raise ValueError(f"algorithms must be asymmetric JWS algorithms; refused: {sorted(unsupported)}")
        self.issuer = issuer
        self.audience = audience
        self.verifications = 0
        self._jwks = jwks
        self._algorithms = algorithms
        self._leeway = leeway_seconds
        self._max_token_bytes = max_token_bytes
        self._clock = clock
        self._verified = _VerifiedTokens(cache_size)
        self._revocations = revocations

    def validate(self, token: str, may_fetch: bool = True) -> Principal:
        """The principal TOKEN speaks for; raises AuthenticationError with the reason otherwise. Without
        MAY_FETCH, raises KeysMustBeFetchedError when the realm's keys must be fetched first (`JwksCache`)."""
        if not token:
            raise AuthenticationError(AuthReason.MISSING, "no access token was presented")
        if len(token) > self._max_token_bytes:
            raise AuthenticationError(AuthReason.TOO_LARGE, f"the token is longer than {self._max_token_bytes} bytes")
        if not token.isascii():
            raise AuthenticationError(AuthReason.MALFORMED, "the token is not a compact JWS")
        digest = hashlib.sha256(token.encode("ascii")).digest()
        cached = self._verified.get(digest)
        if cached is not None:
            principal = self._still_valid(digest, cached, may_fetch)
        else:
            kid = self._checked_header(token)
            claims = self._verified_claims(token, self._jwks.signing_key(kid, may_fetch))
            self._check_lifetime(claims)
            principal = _principal(claims)
            self._verified.put(digest, _Verified(principal, kid))
        # Checked on every call, cached verdict or not: a revocation ends a token remembered as verified too.
        if self._revocations is not None:
            self._revocations.check(principal)
        return principal

    def _still_valid(self, digest: bytes, cached: _Verified, may_fetch: bool) -> Principal:
        if cached.principal.expires_at <= self._clock() - self._leeway:
            self._verified.discard(digest)
            raise AuthenticationError(AuthReason.EXPIRED, "the token has expired")
        # A key withdrawn from the realm, or keys too stale to trust, end the cached verdict too.
        self._jwks.signing_key(cached.kid, may_fetch)
        return cached.principal

    def _checked_header(self, token: str) -> str:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise AuthenticationError(AuthReason.MALFORMED, "the token is not a compact JWS") from None
        except jwt.InvalidTokenError:
            # PyJWT refuses a malformed `crit` or `kid` before we see the header.
            raise AuthenticationError(AuthReason.UNTRUSTED_HEADER, "the token header is not acceptable") from None
        # The allowlist is the server's: the token's `alg` is only compared with it, never used to choose.
        if header.get("alg") not in self._algorithms:
            raise AuthenticationError(
                AuthReason.BAD_ALGORITHM, f"the token is not signed with an allowed algorithm {list(self._algorithms)}"
            )
        refused = REFUSED_HEADERS & header.keys()
        if refused:
            raise AuthenticationError(AuthReason.UNTRUSTED_HEADER, f"the token header carries {sorted(refused)}")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthenticationError(AuthReason.MALFORMED, "the token header names no key id")
        return kid

    def _verified_claims(self, token: str, key: jwt.PyJWK) -> dict[str, Any]:
        self.verifications += 1
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=list(self._algorithms),
                audience=self.audience,
                issuer=self.issuer,
                # Times are checked by `_check_lifetime` with our clock, the same rule as for cached tokens.
                options={"require": list(REQUIRED_CLAIMS), "verify_exp": False, "verify_nbf": False,
                         "verify_iat": False, "enforce_minimum_key_length": True},
            )
        except jwt.MissingRequiredClaimError as error:
            if error.claim == "aud":
                raise AuthenticationError(AuthReason.WRONG_AUDIENCE, "the token names no audience") from None
            raise AuthenticationError(AuthReason.MALFORMED, f"the token lacks the `{error.claim}` claim") from None
        except jwt.PyJWTError as error:
            for kind, reason, detail in _PYJWT_REASONS:
                if isinstance(error, kind):
                    raise AuthenticationError(reason, detail) from None
            raise AuthenticationError(AuthReason.MALFORMED, "the token's claims are malformed") from None
        if claims.get("typ") != ACCESS_TOKEN_TYPE:
            raise AuthenticationError(AuthReason.NOT_AN_ACCESS_TOKEN, "only access tokens (typ Bearer) are accepted")
        return claims

    def _check_lifetime(self, claims: Mapping[str, Any]) -> None:
        now = self._clock()
        if _numeric_date(claims, "exp") <= now - self._leeway:
            raise AuthenticationError(AuthReason.EXPIRED, "the token has expired")
        if _numeric_date(claims, "iat") > now + self._leeway:
            raise AuthenticationError(AuthReason.NOT_YET_VALID, "the token was issued in the future")
        if "nbf" in claims and _numeric_date(claims, "nbf") > now + self._leeway:
            raise AuthenticationError(AuthReason.NOT_YET_VALID, "the token is not valid yet")


def _numeric_date(claims: Mapping[str, Any], name: str) -> float:
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthenticationError(AuthReason.MALFORMED, f"the `{name}` claim is not a number")
    # JSON as Python reads it also has Infinity and NaN (NaN compares false with everything: an `exp` of NaN would
    # never be past), and integers of any size. A time is a finite number of seconds, or the token is malformed.
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds):
        raise AuthenticationError(AuthReason.MALFORMED, f"the `{name}` claim is not a finite number")
    return seconds


def _principal(claims: Mapping[str, Any]) -> Principal:
    subject, client_id = claims["sub"], claims["azp"]
    username, token_id, session_id = claims.get("preferred_username"), claims.get("jti"), claims.get("sid")
    realm_access = claims.get("realm_access", {})
    roles = realm_access.get("roles", []) if isinstance(realm_access, dict) else None
    if (
        not isinstance(subject, str)
        or not isinstance(client_id, str)
        or not isinstance(username, str)
        or not username
        or not isinstance(token_id, str | None)
        or not isinstance(session_id, str | None)
        or not isinstance(roles, list)
        or not all(isinstance(role, str) for role in roles)
    ):
        raise AuthenticationError(AuthReason.MALFORMED, "the token's identity claims have unexpected types")
    return Principal(subject, username, client_id, frozenset(roles), token_id, int(claims["exp"]),
                     int(claims["iat"]), session_id or None)
