"""The second witness: the checkpoints the audit service published on `audit.checkpoints.v1` (kept forever, one
partition, only the audit principal may write it), read back to check the checkpoint file against them.

The file in the state folder is what a verifier reads; a file that is lost, cut short or replaced would otherwise
read as "no checkpoints yet" (or fewer), and a log rewritten meanwhile would verify against nothing. Every
checkpoint ever published must still be a line of the file: `missing_from_file` names those that are not.
`bastion audit verify` reads the topic as the broker's admin, as an investigator does; the audit service's
`VerifyChain` reads it as the audit principal, a witness of the topic by infra/event-access.yaml (READ by assignment
under its own group, which commits nothing). Both go through `load_witnessed`.
"""

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from bastion.audit.checkpoints import Checkpoint, CheckpointFile
from bastion.audit.errors import CheckpointError, CheckpointsMissingError

TOPIC = "audit.checkpoints.v1"


class WitnessUnavailableError(Exception):
    """The published checkpoints could not be read (Kafka unreachable, the topic missing, a record unreadable)."""


def missing_from_file(published: Iterable[Checkpoint], in_file: Iterable[Checkpoint]) -> list[Checkpoint]:
    """The checkpoints of PUBLISHED that IN_FILE lacks (each compared whole: origin, length, head, key, signature),
    in the order they were published. The file may hold more (a publication that failed is covered by the next)."""
    kept = set(in_file)
    return [checkpoint for checkpoint in published if checkpoint not in kept]


@dataclass(frozen=True)
class Witnessed:
    checkpoints: list[Checkpoint]  # the file's accepted checkpoints (CheckpointFile.load)
    published: int  # checkpoints on the topic, every one of them a line of the file


def load_witnessed(file: CheckpointFile, witness: Callable[[], list[Checkpoint]]) -> Witnessed:
    """FILE's checkpoints, once it is found to hold every checkpoint WITNESS says was published. The witness is read
    first, the file after: the audit service writes a checkpoint to its file before it publishes it, so whatever the
    topic holds now is in the file when it is read next, even while the service goes on signing.

    Raises WitnessUnavailableError (the topic cannot be read: nothing to check the file against), the file's own
    CheckpointError (a line that does not verify), or CheckpointsMissingError (a published checkpoint not in it)."""
    published = witness()
    checkpoints = file.load()
    missing = missing_from_file(published, [checkpoint for _, checkpoint in file.lines()])
    if missing:
        raise CheckpointsMissingError(
            f"the checkpoint file lacks {len(missing)} of the {len(published)} checkpoints published on {TOPIC} "
            f"(the newest it lacks covers {missing[-1].length} records, signed by {missing[-1].key_id}): it was "
            f"lost, cut short or replaced, and the log cannot be checked against what it held")
    return Witnessed(checkpoints, len(published))


def unverified_reason(error: WitnessUnavailableError | CheckpointError) -> str:
    """Why a chain was not checked, for an error `load_witnessed` raised."""
    if isinstance(error, WitnessUnavailableError):
        return ("the published checkpoints cannot be read, so the checkpoint file cannot be checked against them: "
                f"{error}")
    if isinstance(error, CheckpointsMissingError):
        return str(error)
    return f"checkpoint refused: {error}"


def read_published(kafka_config: dict[str, Any], origin: str, timeout: float = 10.0,
                   group: str | None = None) -> list[Checkpoint]:
    """Every checkpoint of ORIGIN on the topic, oldest first, up to where the topic ended when asked. A record that
    is not a checkpoint raises WitnessUnavailableError (only the audit service writes there: it is tampering or a
    fault, and either way the witness cannot be read). GROUP is the consumer group to read under (a principal with
    literal ACLs needs the one it was granted); by default a new one each time (the admin's read). Partitions are
    assigned, never subscribed, and nothing is committed."""
    # auto.offset.reset "error": an offset out of range (records deleted below it) fails the read at once, rather
    # than librdkafka's default jumping to the end and the read timing out with nothing to say why.
    try:
        reader = Consumer({**kafka_config, "group.id": group or f"audit-witness-{uuid.uuid4()}",
                           "enable.auto.commit": False, "enable.partition.eof": False, "auto.offset.reset": "error"})
    except KafkaException as error:  # a configuration librdkafka refuses: a key or certificate file gone, say
        raise WitnessUnavailableError(f"{TOPIC} could not be read: {error}") from None
    try:
        try:
            metadata = reader.list_topics(TOPIC, timeout=timeout).topics[TOPIC]
            if metadata.error is not None:
                raise WitnessUnavailableError(f"no topic {TOPIC}: {metadata.error.str()}")
            starts, ends = {}, {}
            for partition in metadata.partitions:
                low, high = reader.get_watermark_offsets(TopicPartition(TOPIC, partition), timeout=timeout)
                if high > low:
                    starts[partition], ends[partition] = low, high
            if not ends:
                return []
            reader.assign([TopicPartition(TOPIC, partition, starts[partition]) for partition in ends])
            return _read_until(reader, ends, origin, timeout)
        except KafkaException as error:
            raise WitnessUnavailableError(f"{TOPIC} could not be read: {error}") from None
    finally:
        reader.close()


def _read_until(reader: Consumer, ends: dict[int, int], origin: str, timeout: float) -> list[Checkpoint]:
    found: list[tuple[int, int, Checkpoint]] = []
    left = dict(ends)
    deadline = time.monotonic() + timeout
    while left:
        if time.monotonic() > deadline:
            raise WitnessUnavailableError(f"{TOPIC} was not read to its end within {timeout:g} s")
        message = reader.poll(0.5)
        if message is None:
            continue
        if message.error() is not None:
            raise WitnessUnavailableError(f"{TOPIC} could not be read: {message.error().str()}")
        partition, offset = message.partition(), message.offset()
        try:
            checkpoint = Checkpoint.from_bytes(message.value() or b"")
        except CheckpointError as error:
            raise WitnessUnavailableError(f"{TOPIC}/{partition} at offset {offset} holds no checkpoint: {error}") \
                from None
        if checkpoint.origin == origin:
            found.append((partition, offset, checkpoint))
        if offset + 1 >= left.get(partition, 0):
            left.pop(partition, None)
    return [checkpoint for _, _, checkpoint in sorted(found, key=lambda place: (place[0], place[1]))]
