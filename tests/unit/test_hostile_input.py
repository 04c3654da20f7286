"""Hostile input, generated: whatever arrives where the kit reads an event, a bundle, an access token, a trace
context, a correlation id or a certificate's names, it answers with its own refusal, naming a reason, or with what
the input really said: no other exception escapes (a crash is a denial of service, and an exception no one expected
is a path no one reviewed), and nothing malformed is passed on."""

import base64
import datetime as dt
import json
import math
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion.accounts.v1.events_pb2 import AccountOpened
from bastion.devstack.event_access import load_policy
from bastion.events.envelopes import bundle, seal
from bastion.events.errors import RejectReason, VerificationError
from bastion.events.keys import KeyRing
from bastion.events.trust import load_trust_policy
from bastion.events.verify import EnvelopeVerifier, FreshnessWindow
from bastion.grpc.context import SERVICE_NAME, VALID_CORRELATION_ID, correlation_id_from, peer_identity_from
from bastion.grpc.tokens import AuthenticationError, AuthReason, JwksCache, TokenValidator
from bastion.grpc.trace import TRACEPARENT, TRACESTATE, trace_context_from
from bastion.testing.tokens import REALM_ISSUER, FakeJwksEndpoint, ManualClock, TokenMinter
from tests.unit.conftest import SERVICES as PLATFORM_SERVICES

INFRA = Path(__file__).resolve().parents[2] / "infra"
SERVICES = set(PLATFORM_SERVICES)
NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
TOPIC = "accounts.events.v1"
# 300 examples a property in every run; HOSTILE_EXAMPLES=5000 for a longer search (about seven minutes here).
# With CI set (.ci/run sets it) Hypothesis loads its "ci" profile: the examples are derived from each test's code
# (derandomize), so a clean clone runs the same search every time and a red run repeats; elsewhere each run searches
# anew (and keeps what failed in .hypothesis/ to try first next time).
HOSTILE = settings(max_examples=int(os.environ.get("HOSTILE_EXAMPLES", "300")), deadline=None,
                   suppress_health_check=[HealthCheck.too_slow])
TRACEPARENT_SENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]")


@pytest.fixture(scope="module")
def ring(tmp_path_factory: pytest.TempPathFactory) -> KeyRing:
    ring = KeyRing(tmp_path_factory.mktemp("hostile") / "keys")
    ring.ensure(sorted(SERVICES))
    return ring


@pytest.fixture(scope="module")
def verifier(ring: KeyRing) -> EnvelopeVerifier:
    access = load_policy(INFRA / "event-access.yaml", SERVICES)
    return EnvelopeVerifier(ring.trust_store(), load_trust_policy(INFRA / "event-trust.yaml", access),
                            FreshnessWindow(), clock=lambda: NOW)


@pytest.fixture(scope="module")
def sealed(ring: KeyRing) -> bytes:
    return seal(ring.signing_key("accounts"), TOPIC, AccountOpened(account_id="a1", owner="alice", currency="EUR"),
                aggregate_id="a1", sequence=1, correlation_id="c1", occurred_at=NOW).SerializeToString()


@pytest.fixture(scope="module")
def bundled(ring: KeyRing, sealed: bytes) -> bytes:
    return bundle([sealed, sealed], ring.signing_key("accounts"), NOW).SerializeToString()


def changed(raw: bytes, data: st.DataObject) -> bytes:
    """RAW with one byte flipped, inserted or dropped, or cut short: what a careless or hostile hand makes of it."""
    position = data.draw(st.integers(0, len(raw) - 1))
    how = data.draw(st.sampled_from(["flip", "insert", "drop", "cut"]))
    if how == "flip":
        return raw[:position] + bytes([raw[position] ^ data.draw(st.integers(1, 255))]) + raw[position + 1:]
    if how == "insert":
        return raw[:position] + bytes([data.draw(st.integers(0, 255))]) + raw[position:]
    if how == "drop":
        return raw[:position] + raw[position + 1:]
    return raw[:position]


@HOSTILE
@given(raw=st.binary(max_size=4096))
def test_any_bytes_offered_as_an_event_or_a_bundle_are_refused_with_a_named_reason(
        verifier: EnvelopeVerifier, raw: bytes) -> None:
    for verify in (verifier.verify, verifier.verify_bundle):
        with pytest.raises(VerificationError) as refused:
            verify(raw, TOPIC)
        assert refused.value.reason in set(RejectReason)


@HOSTILE
@given(data=st.data())
def test_a_changed_byte_of_a_signed_event_is_refused_or_says_exactly_what_was_signed(
        verifier: EnvelopeVerifier, sealed: bytes, data: st.DataObject) -> None:
    """A change protobuf parses to the same fields (an encoding it tolerates) may pass; anything else is refused."""
    original = verifier.verify(sealed, TOPIC)
    try:
        event = verifier.verify(changed(sealed, data), TOPIC)
    except VerificationError as refused:
        assert refused.reason in set(RejectReason)
        return
    assert event.envelope == original.envelope and event.payload == original.payload


@HOSTILE
@given(data=st.data())
def test_a_changed_byte_of_a_signed_bundle_refuses_it_or_changes_none_of_its_events(
        verifier: EnvelopeVerifier, bundled: bytes, data: st.DataObject) -> None:
    original = [outcome.envelope for outcome in verifier.verify_bundle(bundled, TOPIC).outcomes]
    try:
        verified = verifier.verify_bundle(changed(bundled, data), TOPIC)
    except VerificationError as refused:
        assert refused.reason in set(RejectReason)
        return
    assert [getattr(outcome, "envelope", outcome) for outcome in verified.outcomes] == original


@pytest.fixture(scope="module")
def validator() -> tuple[TokenValidator, TokenMinter]:
    clock = ManualClock()
    minter = TokenMinter(audience="accounts", clock=clock)
    return TokenValidator(REALM_ISSUER, "accounts", JwksCache(FakeJwksEndpoint(minter), clock=clock),
                          clock=clock), minter


@HOSTILE
@given(token=st.one_of(st.text(max_size=600), st.from_regex(r"[A-Za-z0-9_\-]{0,80}(\.[A-Za-z0-9_\-=]{0,80}){0,4}",
                                                               fullmatch=True)))
def test_any_text_offered_as_a_token_is_refused_with_a_named_reason(
        validator: tuple[TokenValidator, TokenMinter], token: str) -> None:
    with pytest.raises(AuthenticationError) as refused:
        validator[0].validate(token)
    assert refused.value.reason in set(AuthReason)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=6)
HEADER_NAMES = st.sampled_from(["alg", "kid", "typ", "crit", "jku", "x5u", "jwk", "x5c", "b64", "zip", "cty"])


def segment(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


@HOSTILE
@given(header=st.dictionaries(HEADER_NAMES | st.text(max_size=6),
                              JSON | st.sampled_from(["RS256", "none", "HS256", "ES256"]), max_size=5),
       claims=JSON, signature=st.binary(max_size=300))
def test_any_header_and_claims_in_the_shape_of_a_token_are_refused_with_a_named_reason(
        validator: tuple[TokenValidator, TokenMinter], header: dict[str, object], claims: object,
        signature: bytes) -> None:
    """Well-formed JSON in the right places, anything in it: the header's fields are read before any key is."""
    token = ".".join([segment(header), segment(claims),
                      base64.urlsafe_b64encode(signature).rstrip(b"=").decode()])
    with pytest.raises(AuthenticationError) as refused:
        validator[0].validate(token)
    assert refused.value.reason in set(AuthReason)


CLAIM_NAMES = st.sampled_from(["exp", "iat", "nbf", "iss", "aud", "sub", "typ", "azp", "realm_access",
                                "preferred_username", "jti"])
NUMBERS = st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)


@HOSTILE
@given(overrides=st.dictionaries(CLAIM_NAMES, JSON | NUMBERS, max_size=4))
def test_claims_of_any_type_in_a_validly_signed_token_give_a_principal_or_a_named_refusal(
        validator: tuple[TokenValidator, TokenMinter], overrides: dict[str, object]) -> None:
    """Even the realm's own signature does not make the kit trust a claim's type: a number where a name belongs,
    an infinite expiry, roles that are not a list of names."""
    tokens, minter = validator
    try:
        principal = tokens.validate(minter.signed_as_is({}, **overrides))
    except AuthenticationError as refused:
        assert refused.reason in set(AuthReason)
        return
    assert isinstance(principal.username, str) and principal.username
    assert all(isinstance(role, str) for role in principal.roles)
    assert principal.expires_at > 0


@HOSTILE
@given(name=st.sampled_from(["exp", "iat", "nbf"]),
       value=NUMBERS | st.sampled_from([math.inf, -math.inf, math.nan, 10**400, -(10**400)]) | JSON)
def test_a_time_claim_of_any_value_in_a_validly_signed_token_gives_a_principal_or_a_named_refusal(
        validator: tuple[TokenValidator, TokenMinter], name: str, value: object) -> None:
    """Python reads JSON's Infinity and NaN and integers of any size: none of them is a time."""
    tokens, minter = validator
    try:
        principal = tokens.validate(minter.signed_as_is({}, **{name: value}))
    except AuthenticationError as refused:
        assert refused.reason in set(AuthReason)
        return
    if value is not None:  # None: the claim left out, which only `nbf` may be
        assert name != "nbf" or (isinstance(value, int | float) and not isinstance(value, bool)
                                 and math.isfinite(value) and value <= minter.claims()["iat"] + 30)
        assert isinstance(value, int | float) and math.isfinite(value)
    assert principal.expires_at == int(minter.claims(**{name: value})["exp"])


@HOSTILE
@given(data=st.data())
def test_a_changed_character_of_a_valid_token_is_refused_or_speaks_for_the_same_principal(
        validator: tuple[TokenValidator, TokenMinter], data: st.DataObject) -> None:
    """Base64url's last character may carry unused bits, so a few changes decode to the same bytes: those may pass,
    as the same principal; any other change is refused."""
    tokens, minter = validator
    token = minter.mint()
    principal = tokens.validate(token)
    position = data.draw(st.integers(0, len(token) - 1))
    replacement = data.draw(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ "))
    forged = token[:position] + replacement + token[position + 1:]
    try:
        assert tokens.validate(forged) == principal
    except AuthenticationError as refused:
        assert refused.reason in set(AuthReason)


TRACEPARENTS = st.one_of(
    st.from_regex(r"[0-9a-fA-F]{2}-[0-9a-fA-F]{32}-[0-9a-fA-F]{16}-[0-9a-fA-F]{2}", fullmatch=True),
    st.from_regex(r"[0-9a-f]{2}-[0-9a-fA-F]{30,34}-[0-9a-f]{14,18}-[0-9a-f]{1,3}(-.{0,8})?", fullmatch=True),
    st.text(max_size=80), st.binary(max_size=60))
TRACESTATES = st.one_of(st.from_regex(r"([ \t]*[a-zA-Z0-9@_*/\-]{0,12}=[ -~]{0,12}[ \t]*,?){1,6}", fullmatch=True),
                        st.text(max_size=80), st.binary(max_size=60))
# The recommendation's list member, written out here rather than taken from the module it checks.
TRACESTATE_MEMBER = re.compile(r"[a-z0-9][a-z0-9_\-*/@]{0,255}"
                               r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")


@HOSTILE
@given(received=st.lists(st.one_of(st.tuples(st.just(TRACEPARENT), TRACEPARENTS),
                                   st.tuples(st.just(TRACESTATE), TRACESTATES),
                                   st.tuples(st.just("other"), st.text(max_size=20))), max_size=5))
def test_any_trace_context_received_hands_on_only_a_well_formed_one(received: list[tuple[str, str | bytes]]) -> None:
    trace = trace_context_from(received)
    headers = dict(trace.child_headers())
    assert TRACEPARENT_SENT.fullmatch(headers[TRACEPARENT])
    assert set(trace.trace_id) != {"0"} and set(trace.span_id) != {"0"}
    if TRACESTATE in headers:
        assert trace.parent_id is not None, "a tracestate travels only with the traceparent it belongs to"
        members = headers[TRACESTATE].split(",")
        assert len(headers[TRACESTATE]) <= 512 and len(members) <= 32
        assert all(TRACESTATE_MEMBER.fullmatch(member) for member in members), members


@HOSTILE
@given(offered=st.text(max_size=100))
def test_any_correlation_id_offered_is_echoed_only_when_well_formed(offered: str) -> None:
    correlation_id = correlation_id_from({"x-correlation-id": offered})
    assert VALID_CORRELATION_ID.fullmatch(correlation_id)
    assert correlation_id == offered or not VALID_CORRELATION_ID.fullmatch(offered)


@HOSTILE
@given(key=st.sampled_from([None, "x509_subject_alternative_name", "x509_common_name", ""]),
       names=st.one_of(st.none(), st.lists(st.one_of(
           st.binary(max_size=60),
           st.from_regex(r"(?i:spiffe)://bastion\.local/service/.{0,20}", fullmatch=True).map(str.encode),
           st.sampled_from([b"spiffe://bastion.local/service/payments", b"SPIFFE://bastion.local/service/accounts",
                            b"Spiffe://other.domain/service/payments", b"localhost", b"127.0.0.1"])), max_size=4)))
def test_any_certificate_names_give_one_service_of_the_trust_domain_or_no_identity(
        key: str | None, names: list[bytes] | None) -> None:
    identity = peer_identity_from(key, names)
    if identity is None:
        return
    assert SERVICE_NAME.fullmatch(identity)
    assert key == "x509_subject_alternative_name" and names is not None
    assert [name for name in names if name[:9].lower() == b"spiffe://"] == \
        [f"spiffe://bastion.local/service/{identity}".encode()]
