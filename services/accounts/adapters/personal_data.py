"""Personal fields of accounts' events sealed with the topic's data key (AES-256-GCM, bastion/events/field_crypto.py),
which only the readers of infra/personal-data.yaml hold a copy of."""

from bastion.events.field_crypto import DataKeyRing, encrypt_field, field_context
from bastion.events.v1.envelope_pb2 import EncryptedField

TOPIC = "accounts.events.v1"


class SealedForReaders:
    def __init__(self, ring: DataKeyRing) -> None:
        self.ring = ring

    def seal(self, field_name: str, aggregate_id: str, plaintext: str) -> EncryptedField:
        return encrypt_field(self.ring, TOPIC, field_context(field_name, aggregate_id), plaintext)
