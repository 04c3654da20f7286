"""Dead letters: a refused record keeps its bytes and the reason, and one too large to be written again with its
headers is kept as a prefix with its size and digest, so its partition never stops on it."""

import hashlib
from typing import Any

import pytest

from bastion.events.consumer import (
    DEAD_LETTER_MAX_BYTES,
    DEAD_LETTER_PREFIX_BYTES,
    ConsumerSettings,
    dead_letter,
    source_of,
)
from bastion.events.errors import RejectReason, VerificationError
from bastion.events.verify import BUNDLE_CONTENT, BUNDLE_HEADER


class Record:
    def topic(self) -> str:
        return "accounts.events.v1"

    def partition(self) -> int:
        return 2

    def offset(self) -> int:
        return 77

    def key(self) -> bytes | None:
        return None


class Acknowledging:
    """Keeps what is produced and acknowledges it at flush."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, dict[str, bytes]]] = []
        self.callbacks: list[Any] = []

    def produce(self, topic: str, value: bytes, key: Any, headers: list[tuple[str, bytes]], on_delivery: Any) -> None:
        self.sent.append((topic, value, dict(headers)))
        self.callbacks.append(on_delivery)

    def flush(self, _timeout: float) -> int:
        for callback in self.callbacks:
            callback(None, None)
        return 0


REFUSED = VerificationError(RejectReason.MALFORMED, "not an envelope bundle")


def test_a_refused_record_keeps_its_bytes_reason_and_place() -> None:
    producer = Acknowledging()
    dead_letter(producer, "notifications", Record(), b"forged", REFUSED, item=3, bundled=True)  # type: ignore[arg-type]
    [(topic, value, headers)] = producer.sent
    assert (topic, value) == ("accounts.events.v1.dlq", b"forged")
    assert headers["bastion-reject-reason"] == b"malformed"
    assert headers["bastion-source"] == b"accounts.events.v1/2/77/3"
    assert headers[BUNDLE_HEADER] == BUNDLE_CONTENT and "bastion-truncated-from" not in headers


def test_a_record_too_large_to_dead_letter_whole_keeps_a_prefix_its_size_and_digest() -> None:
    producer = Acknowledging()
    huge = bytes(range(256)) * ((DEAD_LETTER_MAX_BYTES // 256) + 200)
    dead_letter(producer, "audit", Record(), huge, REFUSED, bundled=True)  # type: ignore[arg-type]
    [(_, value, headers)] = producer.sent
    assert value == huge[:DEAD_LETTER_PREFIX_BYTES]
    assert headers["bastion-truncated-from"] == str(len(huge)).encode()
    assert headers["bastion-sha256"] == hashlib.sha256(huge).hexdigest().encode()


def test_each_place_names_one_record_envelope_or_released_held_event() -> None:
    places = {source_of(Record(), item, released)  # type: ignore[arg-type]
              for item in (None, 0, 2) for released in (None, 0, 2)}
    assert len(places) == 9
    assert source_of(Record(), released=5) == "accounts.events.v1/2/77/released/5"  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", "a/b", "Notifications", "notifications/x", "9lives", "n" * 64, "accounts\n"])
def test_a_consumer_name_that_could_blur_a_place_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="not a service name"):
        ConsumerSettings(name, "group", ["t"])
