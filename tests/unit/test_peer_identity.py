"""The peer's service identity: exactly one SAN URI spiffe://bastion.local/service/NAME, nothing else."""

import pytest

from bastion.grpc.context import SAN_PROPERTY, peer_identity_from

SAN = SAN_PROPERTY


@pytest.mark.parametrize(("key", "identities", "expected"), [
    (SAN, [b"localhost", b"127.0.0.1", b"spiffe://bastion.local/service/payments"], "payments"),
    (SAN, [b"spiffe://bastion.local/service/cli"], "cli"),
    (SAN, [b"localhost", b"127.0.0.1"], None),  # no SPIFFE URI
    (SAN, [b"spiffe://bastion.local/service/cli", b"spiffe://bastion.local/service/payments"], None),  # two
    (SAN, [b"spiffe://bastion.local/service/cli", b"spiffe://elsewhere.example/service/cli"], None),  # two
    (SAN, [b"spiffe://bastion.local/service/cli", b"SPIFFE://bastion.local/service/payments"], None),  # two: a
    # scheme is case-insensitive, so a verifier elsewhere may read the second as the identity
    (SAN, [b"SPIFFE://bastion.local/service/payments"], None),  # one, but not in the form this trust domain issues
    (SAN, [b"spiffe://elsewhere.example/service/payments"], None),  # another trust domain
    (SAN, [b"spiffe://bastion.local/service/payments/admin"], None),  # a path below a service
    (SAN, [b"spiffe://bastion.local/service/"], None),  # no name
    (SAN, [b"spiffe://bastion.local/service/Payments"], None),  # not a service name
    (SAN, [b"spiffe://bastion.local/service/payments\n"], None),  # a name and a line break
    (SAN, [b"spiffe://bastion.local/user/payments"], None),  # not a service
    (SAN, [b"spiffe://bastion.local/service/pay\xffments"], None),  # not UTF-8
    ("x509_common_name", [b"spiffe://bastion.local/service/payments"], None),  # a common name, no SANs
    (SAN, [], None),
    (None, None, None),  # no TLS peer at all
])
def test_only_one_spiffe_service_name_of_this_trust_domain_is_an_identity(
    key: str | None, identities: list[bytes] | None, expected: str | None
) -> None:
    assert peer_identity_from(key, identities) == expected


@pytest.mark.parametrize(("identities", "expected"), [
    ([b"spiffe://bastion.local/service/a" + b"b" * 62], "a" + "b" * 62),  # 63 characters: a DNS label, kept
    ([b"spiffe://bastion.local/service/a" + b"b" * 63], None),  # 64 characters: too long
    ([b"spiffe://bastion.local/service/1payments"], None),  # a name starts with a letter
    ([b"spiffe://bastion.local/service/pay.ments"], None),  # no dots in a name
    ([b"spiffe://bastion.local/service/pay_ments"], None),  # no underscores either
    ([b"spiffe://BASTION.local/service/payments"], None),  # the trust domain is compared exactly
    ([b"spiffe://bastion.local/SERVICE/payments"], None),  # so is the path
])
def test_a_service_name_is_a_lower_case_dns_label_under_the_exact_prefix(identities: list[bytes],
                                                                         expected: str | None) -> None:
    assert peer_identity_from(SAN, identities) == expected
