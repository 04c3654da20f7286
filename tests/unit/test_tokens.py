"""Access-token validation: each forgery refused with its own reason, the JWKS cache's limits, the verdict cache."""

import json
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from jwt.warnings import InsecureKeyLengthWarning
from structlog.testing import capture_logs

from bastion.devstack.pki import DevPki
from bastion.grpc.tokens import (
    SUPPORTED_ALGORITHMS,
    AuthenticationError,
    AuthReason,
    JwksCache,
    KeysMustBeFetchedError,
    Principal,
    TokenValidator,
    jwks_url,
    signing_keys,
)
from bastion.revocations.revoked import COMMIT_MARGIN_SECONDS, RevokedTokens
from bastion.testing.tokens import REALM_ISSUER, FakeJwksEndpoint, ManualClock, TokenMinter

SERVICE = "accounts"


@pytest.fixture()
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture()
def minter(clock: ManualClock) -> TokenMinter:
    return TokenMinter(audience=SERVICE, clock=clock)


@pytest.fixture()
def endpoint(minter: TokenMinter) -> FakeJwksEndpoint:
    return FakeJwksEndpoint(minter)


@pytest.fixture()
def jwks(endpoint: FakeJwksEndpoint, clock: ManualClock) -> JwksCache:
    return JwksCache(endpoint, clock=clock)


@pytest.fixture()
def validator(jwks: JwksCache, clock: ManualClock) -> TokenValidator:
    return TokenValidator(REALM_ISSUER, SERVICE, jwks, clock=clock)


def refused(validator: TokenValidator, token: str) -> AuthReason:
    with pytest.raises(AuthenticationError) as caught:
        validator.validate(token)
    error = caught.value
    message = f"{error} {error!r} {error.detail}"
    assert error.__cause__ is None
    if token:
        assert token not in message
        assert all(part not in message for part in token.split(".") if len(part) > 8)
    return error.reason


def test_a_keycloak_access_token_yields_its_principal(validator: TokenValidator, minter: TokenMinter,
                                                      clock: ManualClock) -> None:
    principal = validator.validate(minter.mint(jti="t-1", sid="s-1", realm_access={"roles": ["customer", "teller"]}))
    assert principal == Principal(
        subject=minter.claims()["sub"], username="alice", client_id="bastion-cli",
        roles=frozenset({"customer", "teller"}), token_id="t-1", expires_at=int(clock()) + 300,
        issued_at=int(clock()), session_id="s-1",
    )
    assert not principal.is_service_account
    assert validator.validate(minter.mint(sid=None)).session_id is None  # a client-credentials token has none
    assert refused(validator, minter.mint(sid=7)) == AuthReason.MALFORMED


def test_audience_may_be_a_list_and_service_accounts_are_recognised(validator: TokenValidator,
                                                                   minter: TokenMinter) -> None:
    principal = validator.validate(minter.mint(aud=["payments", SERVICE], azp="payments",
                                               preferred_username="service-account-payments", realm_access=None))
    assert principal.is_service_account and principal.client_id == "payments" and principal.roles == frozenset()


def test_no_token(validator: TokenValidator) -> None:
    assert refused(validator, "") == AuthReason.MISSING


@pytest.mark.parametrize("token", ["not-a-jwt", "a.b.c", "é.é.é", "eyJhbGciOiJSUzI1NiJ9.e30"])
def test_garbage_is_malformed(validator: TokenValidator, token: str) -> None:
    assert refused(validator, token) == AuthReason.MALFORMED


def test_alg_none_is_refused_before_any_key_lookup(validator: TokenValidator, minter: TokenMinter,
                                                  endpoint: FakeJwksEndpoint) -> None:
    assert refused(validator, minter.alg_none()) == AuthReason.BAD_ALGORITHM
    assert endpoint.fetches == 0 and validator.verifications == 0


def test_hs256_keyed_with_the_realm_public_key(validator: TokenValidator, minter: TokenMinter) -> None:
    assert refused(validator, minter.hs256_with_public_key(realm_access={"roles": ["admin"]})) == \
        AuthReason.BAD_ALGORITHM


def test_the_server_refuses_to_allow_symmetric_algorithms(jwks: JwksCache) -> None:
    with pytest.raises(ValueError, match="HS256"):
        TokenValidator(REALM_ISSUER, SERVICE, jwks, algorithms=("RS256", "HS256"))


def test_a_token_in_an_allowed_algorithm_the_realm_key_does_not_use(jwks: JwksCache, minter: TokenMinter,
                                                                   clock: ManualClock) -> None:
    validator = TokenValidator(REALM_ISSUER, SERVICE, jwks, algorithms=("RS256", "PS256"), clock=clock)
    assert refused(validator, minter.mint(algorithm="PS256")) == AuthReason.BAD_ALGORITHM


def test_edited_payload(validator: TokenValidator, minter: TokenMinter) -> None:
    token = minter.edited_payload(minter.mint(), realm_access={"roles": ["admin"]})
    assert refused(validator, token) == AuthReason.BAD_SIGNATURE


def test_stripped_signature(validator: TokenValidator, minter: TokenMinter) -> None:
    assert refused(validator, minter.stripped_signature(minter.mint())) == AuthReason.BAD_SIGNATURE


def test_signed_by_a_foreign_key_under_the_realm_key_id(validator: TokenValidator, minter: TokenMinter) -> None:
    assert refused(validator, minter.mint(key=minter.foreign_key)) == AuthReason.BAD_SIGNATURE


def test_expiry_and_not_before_honour_the_leeway(validator: TokenValidator, minter: TokenMinter,
                                                 clock: ManualClock) -> None:
    now = int(clock())
    assert validator.validate(minter.mint(exp=now - 29)).subject
    assert refused(validator, minter.mint(exp=now - 31)) == AuthReason.EXPIRED
    assert validator.validate(minter.mint(nbf=now + 29)).subject
    assert refused(validator, minter.mint(nbf=now + 60)) == AuthReason.NOT_YET_VALID
    assert refused(validator, minter.mint(iat=now + 60)) == AuthReason.NOT_YET_VALID


def test_a_token_for_another_service(validator: TokenValidator, minter: TokenMinter) -> None:
    assert refused(validator, minter.mint(aud="payments")) == AuthReason.WRONG_AUDIENCE
    assert refused(validator, minter.mint(aud=["payments", "audit"])) == AuthReason.WRONG_AUDIENCE
    assert refused(validator, minter.mint(aud=None)) == AuthReason.WRONG_AUDIENCE


def test_a_token_from_another_issuer(validator: TokenValidator, minter: TokenMinter) -> None:
    assert refused(validator, minter.mint(iss="https://localhost:8443/realms/master")) == AuthReason.WRONG_ISSUER


@pytest.mark.parametrize("typ", ["ID", "Refresh", None])
def test_only_access_tokens_are_accepted(validator: TokenValidator, minter: TokenMinter, typ: str | None) -> None:
    assert refused(validator, minter.mint(typ=typ)) == AuthReason.NOT_AN_ACCESS_TOKEN


@pytest.mark.parametrize("claim", ["exp", "iat", "sub", "azp", "preferred_username"])
def test_required_claims(validator: TokenValidator, minter: TokenMinter, claim: str) -> None:
    removed: dict[str, Any] = {claim: None}
    assert refused(validator, minter.mint(**removed)) == AuthReason.MALFORMED


@pytest.mark.parametrize("claims", [{"exp": "tomorrow"}, {"realm_access": {"roles": "admin"}},
                                    {"preferred_username": 7}, {"preferred_username": ""}])
def test_claims_of_the_wrong_type(validator: TokenValidator, minter: TokenMinter, claims: dict[str, Any]) -> None:
    assert refused(validator, minter.mint(**claims)) == AuthReason.MALFORMED


@pytest.mark.parametrize("header", ["jku", "x5u", "x5c", "jwk", "crit", "b64"])
def test_headers_that_let_a_token_choose_its_key_are_refused(validator: TokenValidator, minter: TokenMinter,
                                                            header: str) -> None:
    foreign_jwk = RSAAlgorithm.to_jwk(minter.foreign_key.public_key(), as_dict=True)
    values: dict[str, dict[str, Any]] = {
        "jku": {"jku": "https://attacker.example/jwks.json"},
        "x5u": {"x5u": "https://attacker.example/cert.pem"},
        "x5c": {"x5c": ["MIIBszCCAVmgAwIBAgIU"]},
        "jwk": {"jwk": foreign_jwk},
        "crit": {"crit": ["exp"], "exp": 1},
    }
    if header == "b64":  # PyJWT drops `b64: true` when it encodes: signed as is, the header kept
        token = minter.signed_as_is({"b64": True})
        assert jwt.get_unverified_header(token)["b64"] is True
    else:
        token = minter.mint(headers=values[header], key=minter.foreign_key if header == "jwk" else None)
    assert refused(validator, token) == AuthReason.UNTRUSTED_HEADER


def test_an_oversized_token_is_refused_before_parsing(validator: TokenValidator, minter: TokenMinter,
                                                      endpoint: FakeJwksEndpoint) -> None:
    assert refused(validator, minter.mint(padding="x" * 9000)) == AuthReason.TOO_LARGE
    assert endpoint.fetches == 0


def test_an_unknown_key_id_costs_one_rate_limited_refresh(validator: TokenValidator, minter: TokenMinter,
                                                          endpoint: FakeJwksEndpoint, clock: ManualClock) -> None:
    validator.validate(minter.mint())
    assert endpoint.fetches == 1
    clock.advance(31)
    assert refused(validator, minter.mint(headers={"kid": "never-published"})) == AuthReason.UNKNOWN_KEY
    assert endpoint.fetches == 2


def test_a_flood_of_random_key_ids_fetches_at_most_once_per_gap(validator: TokenValidator, minter: TokenMinter,
                                                                endpoint: FakeJwksEndpoint,
                                                                clock: ManualClock) -> None:
    validator.validate(minter.mint())
    clock.advance(31)
    for attempt in range(10):
        token = minter.mint(headers={"kid": f"random-{attempt}"}, key=minter.foreign_key)
        assert refused(validator, token) == AuthReason.UNKNOWN_KEY
        clock.advance(2)
    assert endpoint.fetches == 2


def test_without_leave_to_fetch_the_validator_says_where_the_keys_must_be_fetched_first(
        validator: TokenValidator, minter: TokenMinter, endpoint: FakeJwksEndpoint, clock: ManualClock) -> None:
    """The event loop's way (`may_fetch=False`): wherever the keys would be fetched (none yet, an unknown key id, keys
    older than the refresh interval) it says so, and fetches nothing; within the gap it judges from the cache."""
    token = minter.mint(exp=int(clock()) + 3600)
    with pytest.raises(KeysMustBeFetchedError):
        validator.validate(token, may_fetch=False)
    assert endpoint.fetches == 0
    assert validator.validate(token).username == "alice"  # fetched where blocking is fine
    assert validator.validate(token, may_fetch=False).username == "alice"
    unknown = minter.mint(headers={"kid": "never-published"})
    with pytest.raises(AuthenticationError, match="unknown_key"):
        validator.validate(unknown, may_fetch=False)  # within the gap: judged from the cache
    clock.advance(31)
    with pytest.raises(KeysMustBeFetchedError):
        validator.validate(unknown, may_fetch=False)
    assert validator.validate(token, may_fetch=False).username == "alice", "known keys need no fetch"
    clock.advance(300)
    with pytest.raises(KeysMustBeFetchedError):
        validator.validate(token, may_fetch=False)  # a remembered token too, once the keys are due
    assert endpoint.fetches == 1


def test_a_fetch_that_hangs_never_holds_back_a_check_without_leave_to_fetch(
        jwks: JwksCache, minter: TokenMinter, endpoint: FakeJwksEndpoint, clock: ManualClock) -> None:
    """The background refresh holds the cache's lock while Keycloak does not answer: the event loop's checks read
    the keys without it; a key id they do not know is left for a worker thread to wait for (the fetch under way
    may be the one bringing it: a rotation)."""
    jwks.signing_key(minter.kid)
    clock.advance(301)
    endpoint.answering = answering = threading.Event()
    fetching = threading.Thread(target=jwks.signing_key, args=(minter.kid,))
    fetching.start()
    while endpoint.fetches < 2:
        time.sleep(0.01)
    judged: list[object] = []

    def judge() -> None:
        judged.append(jwks.signing_key(minter.kid, may_fetch=False))
        with pytest.raises(KeysMustBeFetchedError):
            jwks.signing_key("never-published", may_fetch=False)
        judged.append("left to a worker thread")

    checking = threading.Thread(target=judge)
    checking.start()
    checking.join(2)
    hung = checking.is_alive()
    answering.set()
    fetching.join(5)
    checking.join(5)
    assert not hung and len(judged) == 2
    with pytest.raises(AuthenticationError, match="unknown_key"):
        jwks.signing_key("never-published", may_fetch=False)  # once the fetch is over: judged from the cache


def test_encryption_keys_of_the_realm_never_verify(validator: TokenValidator, minter: TokenMinter) -> None:
    assert refused(validator, minter.mint(headers={"kid": f"{minter.kid}-enc"})) == AuthReason.UNKNOWN_KEY


def test_only_rsa_and_ec_signature_keys_are_kept(minter: TokenMinter) -> None:
    document = minter.jwks()
    document["keys"].append({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0", "alg": "HS256"})
    assert set(signing_keys(document)) == {minter.kid}
    with pytest.raises(ValueError, match="no usable signing key"):
        signing_keys({"keys": [{"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"}]})


def test_a_rotated_key_is_picked_up_by_the_next_refresh(validator: TokenValidator, minter: TokenMinter,
                                                        endpoint: FakeJwksEndpoint, clock: ManualClock) -> None:
    validator.validate(minter.mint())
    minter.rotate()
    clock.advance(31)
    assert validator.validate(minter.mint()).username == "alice"
    assert endpoint.fetches == 2


def test_keys_are_refreshed_when_older_than_the_refresh_interval(validator: TokenValidator, minter: TokenMinter,
                                                                 endpoint: FakeJwksEndpoint,
                                                                 clock: ManualClock) -> None:
    old_kid = minter.kid
    old_token = minter.mint(exp=int(clock()) + 3600)
    validator.validate(old_token)
    minter.rotate()
    minter.retire(old_kid)
    clock.advance(301)
    # The cached verdict ends with the key: a withdrawn key is no longer trusted once the keys are refreshed.
    assert refused(validator, old_token) == AuthReason.UNKNOWN_KEY
    assert endpoint.fetches == 2


def test_a_failed_refresh_keeps_young_keys_in_use(validator: TokenValidator, minter: TokenMinter,
                                                  endpoint: FakeJwksEndpoint, clock: ManualClock) -> None:
    validator.validate(minter.mint())
    endpoint.failing = True
    clock.advance(400)
    with capture_logs() as logs:
        assert validator.validate(minter.mint()).username == "alice"
    assert endpoint.fetches == 2
    assert [(entry["event"], entry["log_level"]) for entry in logs] == [
        ("jwks_refresh_failed_using_cached_keys", "warning")
    ]


def test_keys_older_than_max_staleness_fail_closed(validator: TokenValidator, minter: TokenMinter,
                                                   endpoint: FakeJwksEndpoint, clock: ManualClock) -> None:
    validator.validate(minter.mint())
    endpoint.failing = True
    clock.advance(3601)
    assert refused(validator, minter.mint()) == AuthReason.KEYS_UNAVAILABLE
    endpoint.failing = False
    clock.advance(31)
    assert validator.validate(minter.mint()).username == "alice"


def test_no_keys_at_all_fails_closed(validator: TokenValidator, minter: TokenMinter,
                                     endpoint: FakeJwksEndpoint) -> None:
    endpoint.failing = True
    assert refused(validator, minter.mint()) == AuthReason.KEYS_UNAVAILABLE
    assert refused(validator, minter.mint()) == AuthReason.KEYS_UNAVAILABLE
    assert endpoint.fetches == 1


def test_a_verified_token_is_not_verified_again(validator: TokenValidator, minter: TokenMinter) -> None:
    token = minter.mint()
    first = validator.validate(token)
    assert validator.validate(token) == first
    assert validator.verifications == 1


def test_a_cached_token_still_expires(validator: TokenValidator, minter: TokenMinter, clock: ManualClock) -> None:
    token = minter.mint()
    validator.validate(token)
    clock.advance(300 + 31)
    assert refused(validator, token) == AuthReason.EXPIRED
    assert validator.verifications == 1


def test_the_verdict_cache_is_bounded(jwks: JwksCache, minter: TokenMinter, clock: ManualClock) -> None:
    validator = TokenValidator(REALM_ISSUER, SERVICE, jwks, clock=clock, cache_size=2)
    tokens = [minter.mint() for _ in range(3)]
    for token in tokens:
        validator.validate(token)
    validator.validate(tokens[0])
    assert validator.verifications == 4


def test_background_refresh_runs_until_stopped(minter: TokenMinter) -> None:
    endpoint = FakeJwksEndpoint(minter)
    cache = JwksCache(endpoint, refresh_interval=0.02, min_refresh_gap=0)
    cache.start_background_refresh()
    deadline = time.monotonic() + 5
    while endpoint.fetches < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    cache.stop()
    fetches = endpoint.fetches
    assert fetches >= 3
    time.sleep(0.05)
    assert endpoint.fetches == fetches


def test_the_jwks_url_must_be_https() -> None:
    with pytest.raises(ValueError, match="https"):
        JwksCache.from_url("http://localhost:8080/realms/bastion/protocol/openid-connect/certs",
                           ssl.create_default_context())
    assert jwks_url(REALM_ISSUER) == f"{REALM_ISSUER}/protocol/openid-connect/certs"


@pytest.fixture()
def certs_server(tmp_path: Path, minter: TokenMinter) -> Iterator[tuple[str, DevPki]]:
    pki = DevPki(tmp_path / "pki", leaf_days=7, reissue_when_days_left=2)
    pki.ensure(["keycloak"])
    body = json.dumps(minter.jwks()).encode()

    class Certs(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Certs)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.paths("keycloak").cert, pki.paths("keycloak").key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield jwks_url(f"https://localhost:{server.server_address[1]}/realms/bastion"), pki
    server.shutdown()
    server.server_close()


def test_keys_are_fetched_over_tls_from_the_realm(certs_server: tuple[str, DevPki], minter: TokenMinter,
                                                  clock: ManualClock) -> None:
    url, pki = certs_server
    cache = JwksCache.from_url(url, ssl.create_default_context(cafile=pki.ca_file))
    validator = TokenValidator(REALM_ISSUER, SERVICE, cache, clock=clock)
    assert validator.validate(minter.mint()).username == "alice"


def test_a_certs_endpoint_with_an_untrusted_certificate_yields_no_keys(certs_server: tuple[str, DevPki],
                                                                       minter: TokenMinter, clock: ManualClock) -> None:
    url, _ = certs_server
    cache = JwksCache.from_url(url, ssl.create_default_context())
    validator = TokenValidator(REALM_ISSUER, SERVICE, cache, clock=clock)
    assert refused(validator, minter.mint()) == AuthReason.KEYS_UNAVAILABLE


def test_a_key_published_for_encryption_is_dropped_whatever_algorithm_it_names(minter: TokenMinter) -> None:
    """`use: enc` alone keeps a key from verifying: Keycloak's encryption keys need not name RSA-OAEP."""
    document = minter.jwks()
    public = RSAAlgorithm.to_jwk(minter.private_key.public_key(), as_dict=True)
    document["keys"] += [{**public, "kid": "enc-rs256", "use": "enc", "alg": "RS256"},
                         {**public, "kid": "enc-no-alg", "use": "enc"}]
    assert set(signing_keys(document)) == {minter.kid}


def test_the_cache_refuses_limits_that_contradict_each_other(endpoint: FakeJwksEndpoint) -> None:
    with pytest.raises(ValueError, match="refresh_interval"):
        JwksCache(endpoint, refresh_interval=7200, max_staleness=3600)
    with pytest.raises(ValueError, match="refresh_interval"):
        JwksCache(endpoint, refresh_interval=0)
    with pytest.raises(ValueError, match="min_refresh_gap"):
        JwksCache(endpoint, min_refresh_gap=-1)


def test_keys_exactly_the_refresh_interval_old_are_refreshed(validator: TokenValidator, minter: TokenMinter,
                                                              endpoint: FakeJwksEndpoint, clock: ManualClock) -> None:
    validator.validate(minter.mint())
    clock.advance(300)
    validator.validate(minter.mint())
    assert endpoint.fetches == 2


def test_keys_exactly_max_staleness_old_still_verify_and_older_ones_fail_closed(
    validator: TokenValidator, minter: TokenMinter, endpoint: FakeJwksEndpoint, clock: ManualClock
) -> None:
    validator.validate(minter.mint())
    endpoint.failing = True
    clock.advance(3600)
    assert validator.validate(minter.mint()).username == "alice"
    clock.advance(1)
    assert refused(validator, minter.mint()) == AuthReason.KEYS_UNAVAILABLE


def test_a_refresh_is_allowed_again_exactly_min_refresh_gap_after_the_last(
    validator: TokenValidator, minter: TokenMinter, endpoint: FakeJwksEndpoint, clock: ManualClock
) -> None:
    validator.validate(minter.mint())
    clock.advance(30)
    assert refused(validator, minter.mint(headers={"kid": "never-published"})) == AuthReason.UNKNOWN_KEY
    assert endpoint.fetches == 2


class _RecordedWaits:
    """Stands in for the refresh loop's stop event: records how long the loop would wait, then stops it."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def wait(self, timeout: float) -> bool:
        self.waits.append(timeout)
        return True


def test_a_failing_background_refresh_waits_at_least_a_second_before_retrying(
    endpoint: FakeJwksEndpoint, clock: ManualClock
) -> None:
    """Keycloak down: the refresh thread never retries in a tight loop, even with no gap between refreshes."""
    endpoint.failing = True
    cache = JwksCache(endpoint, refresh_interval=0.02, min_refresh_gap=0, clock=clock)
    stop = _RecordedWaits()
    cache._stopping = stop  # type: ignore[assignment]
    cache._refresh_loop()
    assert endpoint.fetches == 1 and stop.waits == [1.0]


def test_the_verdict_cache_holds_exactly_its_capacity(jwks: JwksCache, minter: TokenMinter,
                                                      clock: ManualClock) -> None:
    validator = TokenValidator(REALM_ISSUER, SERVICE, jwks, clock=clock, cache_size=2)
    tokens = [minter.mint() for _ in range(2)]
    for token in tokens + tokens:
        validator.validate(token)
    assert validator.verifications == 2


def test_the_validator_needs_an_issuer_and_an_audience(jwks: JwksCache) -> None:
    for issuer, audience in [("", SERVICE), (REALM_ISSUER, ""), (None, SERVICE), (REALM_ISSUER, None)]:
        with pytest.raises(ValueError, match="issuer and the audience"):
            TokenValidator(issuer, audience, jwks)  # type: ignore[arg-type]


def test_a_token_of_exactly_the_size_cap_is_accepted_and_one_byte_over_refused(
    jwks: JwksCache, minter: TokenMinter, clock: ManualClock
) -> None:
    token = minter.mint()
    at_cap = TokenValidator(REALM_ISSUER, SERVICE, jwks, clock=clock, max_token_bytes=len(token))
    assert at_cap.validate(token).username == "alice"
    below = TokenValidator(REALM_ISSUER, SERVICE, jwks, clock=clock, max_token_bytes=len(token) - 1)
    assert refused(below, token) == AuthReason.TOO_LARGE


def test_a_token_expired_exactly_the_leeway_ago_is_refused(validator: TokenValidator, minter: TokenMinter,
                                                           clock: ManualClock) -> None:
    assert refused(validator, minter.mint(exp=int(clock()) - 30)) == AuthReason.EXPIRED


def test_a_cached_token_expires_at_exactly_the_leeway_like_a_fresh_one(validator: TokenValidator,
                                                                       minter: TokenMinter,
                                                                       clock: ManualClock) -> None:
    token = minter.mint()
    validator.validate(token)
    clock.advance(300 + 30)
    assert refused(validator, token) == AuthReason.EXPIRED
    assert validator.verifications == 1


@pytest.mark.parametrize("algorithm", sorted(SUPPORTED_ALGORITHMS - {"RS256"} - {"ES256", "ES384", "ES512"}))
def test_a_supported_algorithm_the_server_did_not_configure_is_refused_before_any_key_lookup(
    validator: TokenValidator, minter: TokenMinter, endpoint: FakeJwksEndpoint, algorithm: str
) -> None:
    """The configured allowlist, not the library's, decides; an unwanted algorithm costs no JWKS fetch."""
    assert refused(validator, minter.mint(algorithm=algorithm)) == AuthReason.BAD_ALGORITHM
    assert refused(validator, minter.hs256_with_public_key()) == AuthReason.BAD_ALGORITHM
    assert endpoint.fetches == 0 and validator.verifications == 0


@pytest.mark.parametrize("kid", [None, ""])
def test_a_token_without_a_key_id_is_malformed_before_any_key_lookup(validator: TokenValidator,
                                                                     minter: TokenMinter,
                                                                     endpoint: FakeJwksEndpoint,
                                                                     kid: str | None) -> None:
    assert refused(validator, minter.mint(headers={"kid": kid})) == AuthReason.MALFORMED
    assert endpoint.fetches == 0


def test_a_realm_key_too_short_to_trust_never_verifies(minter: TokenMinter, clock: ManualClock) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - the weak key under test
    published = {**RSAAlgorithm.to_jwk(weak.public_key(), as_dict=True), "kid": "weak", "use": "sig", "alg": "RS256"}
    validator = TokenValidator(REALM_ISSUER, SERVICE, JwksCache(lambda: {"keys": [published]}, clock=clock),
                               clock=clock)
    with pytest.warns(InsecureKeyLengthWarning):  # PyJWT signs with it, warning as it does
        token = minter.mint(headers={"kid": "weak"}, key=weak)
    assert refused(validator, token) == AuthReason.UNKNOWN_KEY


@pytest.mark.parametrize("claims", [{"iat": True}, {"nbf": True}, {"realm_access": "admin"},
                                    {"realm_access": {"roles": ["customer", 7]}}])
def test_dates_and_roles_of_the_wrong_type_are_malformed(validator: TokenValidator, minter: TokenMinter,
                                                         claims: dict[str, Any]) -> None:
    assert refused(validator, minter.mint(**claims)) == AuthReason.MALFORMED


def test_only_the_service_account_prefix_with_its_dash_makes_a_service_account() -> None:
    person = Principal(subject="s", username="service-accountant", client_id="bastion-cli", roles=frozenset(),
                       token_id=None, expires_at=0)
    assert not person.is_service_account


def test_a_revocation_ends_a_token_remembered_as_verified_and_the_principal_carries_its_iat(
        jwks: JwksCache, clock: ManualClock, minter: TokenMinter) -> None:
    revoked = RevokedTokens(keep_seconds=360, max_staleness_seconds=30, max_watch_silence_seconds=60, clock=clock,
                            monotonic=clock)
    validator = TokenValidator(REALM_ISSUER, SERVICE, jwks, clock=clock, revocations=revoked)
    token = minter.mint()
    assert refused(validator, token) == AuthReason.REVOCATIONS_UNAVAILABLE  # not read yet: nobody can tell
    revoked.confirm_current(clock())
    assert refused(validator, token) == AuthReason.REVOCATIONS_UNAVAILABLE  # read, but nobody watching the realm
    revoked.watched(int(clock() * 1000))
    principal = validator.validate(token)
    assert principal.issued_at == int(clock())
    assert validator.validate(token) == principal and validator.verifications == 1  # now remembered
    revoked.revoke(principal.subject, int(clock() * 1000))
    assert refused(validator, token) == AuthReason.REVOKED
    clock.advance(COMMIT_MARGIN_SECONDS + 1)
    later = minter.mint()  # signed in again after the change
    assert validator.validate(later).subject == principal.subject
    assert refused(validator, token) == AuthReason.REVOKED
