"""Key-compromise labs. A producer's signing key leaks: the operator rotates it and retires the leaked key while
the platform runs, as `bastion keys` does; the thief's events are then refused by every consumer, and no service
was restarted for it (running services follow the key ring: `KeyRing.followed_trust_store`,
`KeyRing.followed_signing_key`). The audit service's key leaks: its new key vouches for the log at once, and a
checkpoint the thief signs with the retired key is refused by the verifier.

These labs change the install for real, as the drills they are: the producer (accounts, the audit service) gets a
new signing key and the leaked one stays retired (`bastion keys list` shows both). The forged checkpoint goes into
a scratch copy of the checkpoint file only, never into the install's own."""

import itertools
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bastion.audit.chain import HASH_BYTES, Head
from bastion.audit.checkpoints import AUDIT_PRODUCER, Checkpoint, CheckpointFile, sign_checkpoint
from bastion.audit.errors import CheckpointError
from bastion.audit.install_tools import ORIGIN
from bastion.devstack.event_access import load_policy
from bastion.devstack.retirement import unanchored_if_retired
from bastion.events.keys import FOLLOW_CHECK_SECONDS, SigningKey, TrustStore
from bastion.labs.bank import Bank, euros
from bastion.labs.base import Evidence
from bastion.labs.events import (
    ACCOUNTS_TOPIC,
    DEPOSITED,
    first_event,
    forged_deposit,
    inject,
    last_notification,
    times_told,
)
from bastion.labs.platform import LabSetupError, Session, TopicTail, new_correlation_id
from bastion.notifications.v1 import notifications_pb2_grpc

LAB = "leaked-signing-key"
PRODUCER = "accounts"
# Long enough for every running service to have looked at the key ring once since it changed.
FOLLOW_WAIT_SECONDS = FOLLOW_CHECK_SECONDS + 1.0


def leaked_signing_key(session: Session) -> Iterator[Evidence]:
    ring = session.key_ring()
    leaked = ring.signing_key(PRODUCER)
    yield Evidence("the leak", f"a copy of {PRODUCER}' active signing key {leaked.key_id} and of its Kafka "
                   "credentials, as anyone who read the state folder of a compromised host holds them")
    new_key = ring.rotate(PRODUCER)
    yield Evidence(f"the response, step 1: `bastion keys rotate {PRODUCER}`",
                   f"new active key {new_key}; {leaked.key_id} verify-only, so events in flight still verify")
    time.sleep(FOLLOW_WAIT_SECONDS)
    bank = Bank(session, LAB)
    inbox = notifications_pb2_grpc.NotificationsStub(session.channel("notifications"))  # type: ignore[no-untyped-call]
    last_seen = last_notification(session, inbox, LAB)
    account = bank.open_account("bob")
    wait = session.target.verdict_wait_seconds
    tail = TopicTail(session, ACCOUNTS_TOPIC)  # where the producer itself publishes (a route may be a stand-in's)
    try:
        bank.deposit(account, 100, new_correlation_id(LAB))
        _, _, genuine = first_event(tail, account, DEPOSITED, wait)
    finally:
        tail.close()
    yield Evidence(f"{PRODUCER}' next event, no service restarted",
                   f"{DEPOSITED} {genuine.event_id} signed with {genuine.key_id}", genuine.key_id == new_key)
    if genuine.key_id != new_key:
        return  # retiring now would refuse the producer's own events: the drill stops with the old key verify-only
    yield from _read_past_the_rotation(session, PRODUCER, wait)
    told = times_told(session, inbox, genuine.event_id, last_seen, wait=True, lab=LAB)
    yield Evidence("bob's notifications", f"told {told} time(s) of that deposit: the new key is believed",
                   told == 1)
    ring.retire(PRODUCER, leaked.key_id)
    yield Evidence(f"step 2: `bastion keys retire {PRODUCER} {leaked.key_id}`",
                   "retired in the trust store, its private key deleted from the key ring")
    time.sleep(FOLLOW_WAIT_SECONDS)
    correlation_id = new_correlation_id(LAB)
    forged = forged_deposit(session, PRODUCER, ACCOUNTS_TOPIC, 100_000_000, correlation_id, key=leaked)
    yield Evidence("the attack", f"a {DEPOSITED} of {euros(100_000_000)} signed with the leaked key, published "
                   f"with {PRODUCER}' stolen Kafka credentials")
    yield from inject(session, ACCOUNTS_TOPIC, PRODUCER, forged.SerializeToString(), "unknown_key", correlation_id)


def _read_past_the_rotation(session: Session, producer: str, wait: float) -> Iterator[Evidence]:
    """Wait until every consumer group of PRODUCER's topics has read all that was written before now, so that
    nothing the producer signed with the old key is left unread when it is retired (what an operator checks
    before `bastion keys retire`)."""
    policy = load_policy(session.ctx.settings.infra_dir / "event-access.yaml", set(session.ctx.service_names))
    groups = policy.readers_of(producer)
    behind = session.behind(groups, wait)
    if behind:
        raise LabSetupError(f"the consumers did not read past the rotation within {wait:.0f}s "
                            f"({', '.join(behind)}): the old key was left verify-only")
    yield Evidence("before retiring", f"every consumer group of {', '.join(sorted(groups))} has read past the "
                   "rotation: nothing signed with the old key is left unread")


AUDIT_LAB = "leaked-audit-key"


def leaked_audit_key(session: Session) -> Iterator[Evidence]:
    ring = session.key_ring()
    layout = session.ctx.layout
    leaked = ring.signing_key(AUDIT_PRODUCER)
    yield Evidence("the leak", f"a copy of the audit service's signing key {leaked.key_id}, which signs the audit "
                   "log's checkpoints, as anyone who read the state folder of a compromised host holds it")
    new_key = ring.rotate(AUDIT_PRODUCER)
    yield Evidence("the response, step 1: `bastion keys rotate audit`", f"new active key {new_key}")
    unanchored = unanchored_if_retired(layout, leaked.key_id)
    written = CheckpointFile(layout.audit_checkpoints_file, ring.trust_store(), ORIGIN).lines()
    anchor = next((checkpoint for _, checkpoint in written if checkpoint.key_id == new_key), None)
    yield Evidence("the audit service signs its log's head with the new key, no restart",
                   f"checkpoint at length {anchor.length} signed with {new_key}" if anchor and not unanchored else
                   f"none yet: {unanchored}", anchor is not None and unanchored is None)
    if anchor is None or unanchored is not None:
        return  # retiring now would leave the log with nothing trusted vouching for it: the old key stays
    wait = session.target.verdict_wait_seconds
    yield from _read_past_the_rotation(session, AUDIT_PRODUCER, wait)
    ring.retire(AUDIT_PRODUCER, leaked.key_id)
    yield Evidence(f"step 2: `bastion keys retire audit {leaked.key_id}`",
                   "retired in the trust store, its private key deleted from the key ring")
    trust = ring.trust_store()
    genuine = CheckpointFile(layout.audit_checkpoints_file, trust, ORIGIN)
    try:
        genuine.load()
    except CheckpointError as error:
        raise LabSetupError(f"the install's own checkpoint file does not verify: {error}") from None
    yield Evidence("the install's checkpoints (calibration)",
                   f"{len(genuine.superseded)} checkpoints of retired keys (the leaked one's among them) "
                   f"superseded by the new key's, which vouches for {genuine.last.length if genuine.last else 0} "
                   "records")
    forged = sign_checkpoint(leaked, ORIGIN, Head(anchor.length + 1, secrets.token_bytes(HASH_BYTES)))
    yield Evidence("the attack", f"a checkpoint of a rewritten log ({forged.length} records, another head hash) "
                   f"signed with the leaked key, added to a scratch copy of the checkpoint file")
    yield verdict_on_copy(layout.audit_checkpoints_file, trust, "right after the new key's first", forged, anchor,
                          after=True)
    yield verdict_on_copy(layout.audit_checkpoints_file, trust, "before the new key's first", forged, anchor)
    yield from _among_the_leaked_keys_own(layout.audit_checkpoints_file, trust, leaked)


def _among_the_leaked_keys_own(path: Path, trust: TrustStore, leaked: SigningKey) -> Iterator[Evidence]:
    """A forgery only the retirement stops: in order inside the leaked key's own run of lines, between two of them
    whose lengths leave room (a log one record longer than the first, another head hash). A verifier that ignored
    the retirement would believe it."""
    written = [checkpoint for _, checkpoint in CheckpointFile(path, trust, ORIGIN).lines()]
    lines = [None, *written]  # None: the start of the file, before every line
    room = next(((after, before) for after, before in itertools.pairwise(lines)
                 if before is not None and before.key_id == leaked.key_id
                 and (after is None or after.key_id == leaked.key_id)
                 and before.length - (after.length if after is not None else 0) >= 2), None)
    if room is None:
        yield Evidence("a forgery in order among the leaked key's own", "not tried: its lines leave no room between "
                       "them (it signed little before the rotation)")
        return
    after, before = room
    forged = sign_checkpoint(leaked, ORIGIN, Head((after.length if after is not None else 0) + 1,
                                                  secrets.token_bytes(HASH_BYTES)))
    yield verdict_on_copy(path, trust, "among the leaked key's own, in order", forged, before)


def verdict_on_copy(path: Path, trust: TrustStore, where: str, forged: Checkpoint, beside: Checkpoint,
                    after: bool = False) -> Evidence:
    """What the verifier says of a scratch copy of PATH with FORGED added just before (or AFTER) its line BESIDE:
    refused is the defence firing; believed is the attack getting through."""
    what = f"`bastion audit verify` on the copy, the forgery {where}"
    with tempfile.TemporaryDirectory(prefix="lab-audit-key-") as scratch:
        copy = Path(scratch) / path.name
        shutil.copyfile(path, copy)
        os.chmod(copy, 0o600)
        lines = copy.read_text(encoding="utf-8").splitlines(keepends=True)
        at = lines.index(beside.to_json() + "\n") + (1 if after else 0)
        lines.insert(at, forged.to_json() + "\n")
        copy.write_text("".join(lines), encoding="utf-8")
        try:
            accepted = CheckpointFile(copy, trust, ORIGIN).load()
        except CheckpointError as error:
            return Evidence(what, f"checkpoint refused: {type(error).__name__}: {error}".replace(scratch, "SCRATCH"),
                            True)
    believed = forged in accepted
    return Evidence(what, "the forged checkpoint is believed" if believed else "loaded, the forgery set aside",
                    not believed)
