"""The names a component's certificate carries, shared by the dev PKI that issues certificates and by the kit that
reads and checks them: who a peer is (its SPIFFE URI) and which server a client will accept (a DNS name that only
that server's certificate holds)."""

TRUST_DOMAIN = "bastion.local"
SPIFFE_PREFIX = f"spiffe://{TRUST_DOMAIN}/service/"


def spiffe_id(name: str) -> str:
    """The workload identity component NAME's certificate carries as a SAN URI."""
    return f"{SPIFFE_PREFIX}{name}"


def server_name(name: str) -> str:
    """The DNS name only component NAME's certificate carries. Every leaf also names localhost and 127.0.0.1, so a
    client that asks for the address alone would take any component of the dev CA for the server it called (a
    compromised notifications, listening where accounts should be, would be handed payments' calls and tokens);
    asking for this name, a client accepts that one component's certificate and no other."""
    return f"{name}.{TRUST_DOMAIN}"
