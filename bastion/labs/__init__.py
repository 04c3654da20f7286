"""The attack labs: each runs one attack against the running stack and shows the defence that stops it.

`LABS` is the catalogue, in the order of the training path (docs/training.md); `bastion.labs.scorecard` maps
the concerns of the security guide to these labs. `bastion lab list`, `bastion lab run NAME|--all`.
"""

from bastion.labs import (
    access,
    audit,
    backup,
    detection,
    edge,
    events,
    keys,
    logs,
    money,
    ordering,
    personal,
    supply,
    tokens,
    transport,
)
from bastion.labs.base import Lab

LABS: tuple[Lab, ...] = (
    Lab("no-client-certificate", "Calling a service without a dev-CA client certificate",
        attack="Call accounts with alice's genuine token over TLS without a client certificate, with a certificate "
               "from a CA of the attacker's own, and over plaintext HTTP/2.",
        defence="Mutual TLS required by the server: the handshake fails before any interceptor or handler runs "
                "(the caller sees UNAVAILABLE).",
        where="bastion/grpc/server.py (server_credentials, require_client_auth), bastion/devstack/pki.py",
        expect="UNAVAILABLE", probe=transport.no_client_certificate),
    Lab("forged-token", "Forged access tokens: alg none, key confusion, an edited payload",
        attack="Raise alice's roles to support in a copy of her token and sign it with alg none, with HS256 keyed "
               "with the realm's public key, or not at all (the RS256 signature of the original kept).",
        defence="Local JWT validation: the server's algorithm allowlist (RS256), the realm's keys from its JWKS, "
                "exact issuer and audience, expiry: UNAUTHENTICATED.",
        where="bastion/grpc/tokens.py (TokenValidator), bastion/grpc/interceptor.py (_authenticate)",
        expect="UNAUTHENTICATED", probe=tokens.forged_token),
    Lab("foreign-audience", "Genuine tokens at a service they were not issued for",
        attack="Present payments' genuine service token (aud: accounts) to notifications, and notifications' "
               "token (no audience) to accounts, each over its own service's certificate.",
        defence="The audience check: a token must name the service it is presented to: UNAUTHENTICATED.",
        where="bastion/grpc/tokens.py (audience), infra/keycloak/identities.yaml (who a token is for)",
        expect="wrong_audience", probe=tokens.foreign_audience),
    Lab("revoked-session", "A token that outlives its session",
        attack="Alice signs out (or her session is ended); her unexpired access token is then used for a "
               "transfer above the step-up amount.",
        defence="Large transfers check the session online with Keycloak's introspection (fail closed): "
                "PERMISSION_DENIED at once; within seconds the audit service publishes the sign-out as the "
                "session's revocation, and every service refuses the session's tokens: UNAUTHENTICATED (revoked).",
        where="services/payments/handlers.py (needs_step_up), services/payments/adapters/gateways.py, "
              "infra/revocation-triggers.yaml (user_events), bastion/revocations/",
        expect="revoked", probe=tokens.revoked_session),
    Lab("removed-role", "A token that outlives the role it carries",
        attack="An administrator takes a customer's role away in Keycloak; the customer goes on calling accounts "
               "with the access token issued before, unexpired and validly signed, which still says customer.",
        defence="Token revocation: the audit service turns the realm's admin event into a signed AccessRevoked on "
                "identity.revocations.v1, and every service refuses tokens issued before it: UNAUTHENTICATED "
                "(revoked) within about a second, not when the token expires.",
        where="infra/revocation-triggers.yaml, bastion/revocations/ (watcher, feed, revoked), bastion/grpc/tokens.py",
        expect="revoked", probe=tokens.removed_role),
    Lab("service-impersonation", "One service acting as another: accounts.ApplyTransfer without being payments",
        attack="Move alice's money with accounts.ApplyTransfer (payments only) as notifications, as notifications "
               "holding a stolen payments token, and as alice herself.",
        defence="The method policy: ApplyTransfer admits only the payments identity, and a service rule needs the "
                "certificate and the service-account token of the same client: PERMISSION_DENIED.",
        where="infra/policies/accounts.yaml, bastion/grpc/policy.py, bastion/grpc/context.py (SPIFFE identity)",
        expect="PERMISSION_DENIED", probe=access.service_impersonation),
    Lab("other-customer-account", "Bob reaches for alice's account",
        attack="As bob, read alice's account, look for it in his list, and send money out of it through payments.",
        defence="Object-level checks in the handlers: another customer's account is NOT_FOUND, so bob cannot even "
                "learn that it exists; the method policy alone would let a customer call GetAccount.",
        where="services/accounts/handlers.py (_visible), services/payments/handlers.py (owner of the source)",
        expect="NOT_FOUND", probe=access.other_customer_account),
    Lab("datastore-access", "Reaching into data stores without the right credentials",
        attack="Use Redis without credentials, read accounts' keys and flush Redis as payments, talk to Redis "
               "without TLS, open the payments database as accounts, connect to PostgreSQL without TLS or without "
               "a password.",
        defence="Redis on TLS only, with ACL users confined to their key prefix, the default user off; one "
                "PostgreSQL role and database per service, TLS-only SCRAM in pg_hba.conf.",
        where="bastion/devstack/components/redis.py (acl_lines), bastion/devstack/components/postgres.py",
        expect="NoPermissionError", probe=access.datastore_access),
    Lab("rate-limit", "A burst of calls from one principal",
        attack="Call accounts.ListAccounts as ada from 16 threads as fast as they go, until refused.",
        defence="A per-principal fixed window counted in Redis and shared by every replica: RESOURCE_EXHAUSTED "
                "for that principal only.",
        where="bastion/grpc/ratelimit.py, bastion/runtime.py (the limits), bastion/grpc/interceptor.py",
        expect="RESOURCE_EXHAUSTED", probe=edge.rate_limit),
    Lab("hostile-input", "Amounts no int64 holds, and an oversized message",
        attack="Send transfers whose amount is zero, negative, or beyond int64 on the wire, and a 2 MiB request.",
        defence="Validation in the payments core (positive amounts only) and the server's 1 MiB message cap: "
                "INVALID_ARGUMENT and RESOURCE_EXHAUSTED; nothing moves.",
        where="services/payments/domain.py (validate), bastion/grpc/server.py (max message size)",
        expect="INVALID_ARGUMENT", probe=edge.hostile_input),
    Lab("forged-log-line", "Text that tries to forge a log line or repaint the operator's terminal",
        attack="Send a correlation id carrying forged fields with a refused call, and an event whose ids are a line "
               "break, a whole forged JSON log line, a clear-screen escape sequence and a right-to-left override.",
        defence="Ids that are not well formed are never echoed nor logged (a fresh correlation id, claims logged as "
                "(malformed)), and every service writes JSON lines in which any such character is escaped.",
        where="bastion/grpc/context.py (correlation_id_from), bastion/events/consumer.py (safe_claim), "
              "bastion/service_logs.py",
        expect="no raw control character", probe=logs.forged_log_line),
    Lab("plaintext-broker", "Talking to Kafka without TLS",
        attack="Send a Kafka request in the clear to the client listener, and connect to the controller listener "
               "without a client certificate.",
        defence="No PLAINTEXT listener: clients speak SASL_SSL (TLS 1.3), the controller requires mutual TLS.",
        where="bastion/devstack/components/kafka.py (server_properties)",
        expect="no Kafka answer", probe=transport.plaintext_broker),
    Lab("network-exposure", "Reaching the stack from the network",
        attack="Connect to every port of the stack (services, Kafka, Keycloak, PostgreSQL, Redis) at this "
               "machine's network addresses instead of loopback, as another host on the network would.",
        defence="Every listener binds loopback only (bind_host), on non-default ports: connection refused.",
        where="bastion/settings.py (bind_host), bastion/devstack/components/, bastion/runtime.py",
        expect="connection refused on every port", probe=transport.network_exposure),
    Lab("tampered-download", "A tampered jar, and an extra one, in the download Kafka runs from",
        attack="In a scratch copy of the download cache, flip one byte of kafka-clients, then slip an extra jar "
               "into the folder Kafka's classpath is built from.",
        defence="Every file of a pinned distribution is checked against its SHA-256 in infra/distributions.yaml by "
                "`bastion setup` and by every `bastion up`, and no file may be missing or added: refused.",
        where="infra/distributions.yaml, bastion/devstack/distributions.py (fetch, verify)",
        expect="is pinned", probe=supply.tampered_download),
    Lab("tampered-package", "A backdoored Python package served at the version the lock pins",
        attack="Serve, from a stand-in for the package index, a tenacity wheel of the version requirements.lock "
               "pins with code that runs on import, and install it as `make setup` installs every package.",
        defence="Every Python package is installed from requirements.lock with the SHA-256 of each of its files "
                "(pip --require-hashes, wheels only, nothing resolved afresh): refused before anything installs.",
        where="requirements.lock, scripts/install_locked_deps.sh, bastion/devstack/python_lock.py, "
              "docs/dependencies.md",
        expect=supply.HASH_REFUSAL, probe=supply.tampered_package),
    Lab("topic-without-acl", "Writing to a topic without the ACL",
        attack="Produce a record to payments.events.v1 with notifications' genuine SCRAM credentials.",
        defence="Kafka's StandardAuthorizer, default deny, with ACLs generated only from infra/event-access.yaml: "
                "TOPIC_AUTHORIZATION_FAILED.",
        where="infra/event-access.yaml, bastion/devstack/event_access.py, bastion/devstack/kafka_admin.py",
        expect="TOPIC_AUTHORIZATION_FAILED", probe=events.topic_without_acl),
    Lab("insider-reads-personal-data", "An insider reads the personal data in topics and databases",
        attack="Bob opens an account giving an e-mail address; read it back as the Kafka admin from the topic, as "
               "the audit role from the audit log, and with notifications' database credentials.",
        defence="Field encryption: accounts seals the address with the topic's data key that only notifications "
                "holds (AES-256-GCM); notifications keeps it sealed under an at-rest key outside its database.",
        where="infra/personal-data.yaml, bastion/events/field_crypto.py, services/accounts/adapters/personal_data.py, "
              "services/notifications/adapters/at_rest.py",
        expect="not in clear", probe=personal.insider_reads_personal_data),
    Lab("tampered-event", "A signed event altered in transit",
        attack="Rewrite the amount of a MoneyDeposited signed by accounts from 1.00 to 1,000,000.00 EUR, keep the "
               "signature, and publish it to accounts.events.v1.",
        defence="Ed25519 signatures over the canonical bytes, checked by every verifying consumer: dead-lettered "
                "with reason bad_signature, logged, and recorded in the audit log.",
        where="bastion/events/signing.py, bastion/events/verify.py, bastion/events/consumer.py",
        expect="bad_signature", probe=events.tampered_event),
    Lab("foreign-event-type", "A producer emitting another producer's event type",
        attack="Payments publishes a bastion.accounts.v1.MoneyDeposited, validly signed with its own key, on its "
               "own topic payments.events.v1.",
        defence="The trust policy: which producer may emit which type on which topic; dead-lettered with reason "
                "not_authorised.",
        where="infra/event-trust.yaml, bastion/events/trust.py, bastion/events/verify.py",
        expect="not_authorised", probe=events.foreign_event_type),
    Lab("forged-revocation", "A revocation forged with a stolen service key",
        attack="With payments' signing key, sign an AccessRevoked that ends a customer's tokens and publish it on "
               "identity.revocations.v1: as payments' own Kafka principal, then past the ACLs as the broker's admin.",
        defence="Only the audit principal may write the topic (Kafka ACL: TOPIC_AUTHORIZATION_FAILED), and only the "
                "audit service may sign a revocation (the trust policy): every service refuses it not_authorised, "
                "records the refusal in the audit log, and the customer's token still counts.",
        where="infra/event-access.yaml, infra/event-trust.yaml, bastion/revocations/feed.py, "
              "bastion/events/consumer.py (append_rejection)",
        expect="not_authorised", probe=tokens.forged_revocation),
    Lab("unknown-schema", "An event carrying fields its schema does not know",
        attack="Accounts signs a MoneyDeposited whose payload carries an extra field no schema defines, as a "
               "malicious or newer producer could.",
        defence="Strict parsing of envelope and payload, unknown fields rejected: dead-lettered with reason "
                "unknown_fields.",
        where="bastion/events/verify.py (_has_unknown_fields), bastion/events/catalog.py",
        expect="unknown_fields", probe=events.unknown_schema),
    Lab("replayed-event", "A captured event published again",
        attack="Capture the genuine MoneyDeposited accounts published for a deposit into bob's account and "
               "publish the same bytes again.",
        defence="The inbox: an event id already applied has no second effect (and one older than 5 minutes is "
                "refused as stale); bob is told once.",
        where="bastion/events/inbox.py, bastion/events/verify.py (freshness), bastion/events/consumer.py",
        expect="reason=duplicate", probe=events.replayed_event),
    Lab("reordered-events", "Two events of an account delivered in the wrong order",
        attack="Publish event 2 of an account's sequence before event 1 (a record delayed on the way, a producer "
               "retrying out of order, someone in the middle reordering), both genuinely signed by accounts.",
        defence="Per-aggregate sequences: each verifying consumer that applies events holds event 2 back until "
                "event 1 comes, then applies 1 and 2 in their order, once each (its inbox and last applied "
                "sequence show it).",
        where="bastion/events/inbox.py (admit, take_held), bastion/events/consumer.py",
        expect="applies 1, then 2", probe=ordering.reordered_events),
    Lab("leaked-signing-key", "A producer's signing key leaks: rotate, retire, and the thief's events are refused",
        attack="With a copy of accounts' signing key and Kafka credentials, publish a deposit of 1,000,000.00 EUR "
               "after the operator rotated the key and retired the leaked one, with every service still running.",
        defence="Running services follow the key ring: accounts signs with its new key, and every consumer refuses "
                "the retired one, within seconds and without a restart: reason unknown_key.",
        where="bastion/events/keys.py (rotate, retire, Followed), bastion/events/verify.py (EnvelopeVerifier), "
              "bastion/labs/keys.py",
        expect="unknown_key", probe=keys.leaked_signing_key),
    Lab("leaked-audit-key", "The audit service's key leaks: a forged checkpoint for a rewritten log",
        attack="With a copy of the audit service's signing key, taken before the operator rotated and retired it, "
               "sign a checkpoint of a rewritten log (one record more, another head hash) and add it to a copy of "
               "the checkpoint file, right after the new key's first checkpoint and before it.",
        defence="The audit service signs its log's head with its new key within seconds of the rotation, and "
                "retiring waits for it; a retired key's checkpoints count only when a trusted one covers them, and "
                "a key signs no more once the file moved on to another, so the verifier refuses the forgery "
                "wherever it stands.",
        where="bastion/audit/checkpoints.py (Checkpointer.due, CheckpointFile.load), bastion/devstack/retirement.py",
        expect="checkpoint refused", probe=keys.leaked_audit_key),
    Lab("double-spend", "A double-spend race",
        attack="From an account holding 10.00 EUR, send 8 transfers of 3.00 EUR at once with one idempotency "
               "key, then 12 at once, each with its own key.",
        defence="A fenced Redis lock on the source account, debit and credit in one transaction with rows locked "
                "in order, CHECK (balance_minor >= 0), idempotency keys: no overdraft, one debit per key.",
        where="services/payments/handlers.py, services/accounts/handlers.py, services/accounts/adapters/postgres.py",
        expect="insufficient funds", probe=money.double_spend),
    Lab("paused-lock-holder", "A paused lock holder wakes up (fencing)",
        attack="Take payments' lock on alice's account, freeze past its TTL while the payments service completes a "
               "transfer, then wake up and call ApplyTransfer with the old fencing token.",
        defence="Fencing tokens: accounts accepts a transfer only with a token newer than the last it accepted "
                "for the account: FAILED_PRECONDITION, money conserved.",
        where="bastion/resilience/locks.py (FencedLock), services/accounts/domain.py (apply_transfer)",
        expect="is not newer than", probe=money.paused_lock_holder),
    Lab("retry-storm", "A retry storm against a failing downstream",
        attack="Call a downstream that fails every request 30 times in a row through the client kit, as a caller "
               "under load would.",
        defence="Retries only on transient codes within a deadline and a retry budget, and a circuit breaker "
                "shared through Redis: once open, calls fail fast with UNAVAILABLE without reaching the downstream.",
        where="bastion/grpc/client.py (Downstream), bastion/resilience/breaker.py, bastion/resilience/retry.py",
        expect="circuit open", probe=money.retry_storm),
    Lab("audit-tampering", "Rewriting the audit log",
        attack="Update, delete and truncate the audit log as the audit service's role and as the database admin; "
               "then, as the admin with the trigger disabled, edit a record of a scratch copy of the log; last, "
               "delete the checkpoint file (in a scratch folder) so that nothing seems signed yet.",
        defence="Grants (the service role may only INSERT and SELECT), an ENABLE ALWAYS trigger refusing UPDATE, "
                "DELETE and TRUNCATE to everyone, and the hash chain with signed checkpoints the verifier checks, "
                "the file against every checkpoint published on audit.checkpoints.v1.",
        where="bastion/audit/postgres.py (install), bastion/audit/verify.py, bastion/audit/install_tools.py, "
              "bastion/audit/published.py",
        expect="first bad seq", probe=audit.audit_tampering),
    Lab("permission-probing", "A customer trying a teller's method again and again",
        attack="Call accounts.Deposit, which only tellers may, as alice (a customer) as many times as the "
               "permission-probing rule's threshold, within seconds.",
        defence="Every call is denied and becomes a signed access decision; the audit service counts the denials "
                "per caller and raises a signed SecurityAlert back into the audit log, logged and counted; the "
                "auditors of infra/alert-recipients.yaml are notified.",
        where="infra/alert-rules.yaml, bastion/audit/alerts.py, services/audit/adapters/postgres.py (PostgresAlerts)",
        expect="permission-probing", probe=detection.permission_probing),
    Lab("suppressed-event", "An event withheld in transit, the next one let through",
        attack="Keep event 1 of an account's sequence off the accounts topic (a record dropped on the way) and "
               "publish event 2, genuinely signed by accounts, in its place.",
        defence="Per-aggregate sequences: each verifying consumer holds event 2 back instead of applying it out "
                "of order, and reports the gap once it stays open (a sequence_gap security record, logged and "
                "counted); the audit service raises a signed sequence-gaps SecurityAlert, and the auditors of "
                "infra/alert-recipients.yaml are notified. Nothing is lost: event 2 is applied if event 1 ever comes.",
        where="bastion/events/inbox.py (admit, open_gaps), bastion/events/consumer.py (report_open_gaps), "
              "infra/alert-rules.yaml",
        expect="sequence-gaps", probe=detection.suppressed_event),
    Lab("stolen-backup", "A thief with a copy of a backup",
        attack="Back up the notifications database, then, as a thief with a copy: read the archive, decrypt it "
               "with an age identity of one's own, and put an archive of one's own, encrypted to the install's "
               "public recipient, in place of the genuine one.",
        defence="Backups are age archives to the install's recipient (only its identity decrypts) under a manifest "
                "of SHA-256 digests signed with the install's Ed25519 backup key: `verify` and `restore` refuse "
                "any file the manifest does not vouch for.",
        where="bastion/devstack/backups.py (create, verify, restore), docs/devstack.md",
        expect="does not match its digest", probe=backup.stolen_backup),
)


def find(name: str) -> Lab | None:
    return next((lab for lab in LABS if lab.name == name), None)
