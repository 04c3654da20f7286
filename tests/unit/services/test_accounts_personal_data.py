"""The accounts adapter that seals personal fields: under the accounts topic's data key, bound to one account."""

from pathlib import Path

import pytest

from bastion.events.field_crypto import DataKeyRing, FieldIntegrityError, decrypt_field, field_context
from services.accounts.adapters.personal_data import SealedForReaders
from services.accounts.handlers import OWNER_EMAIL

TOPIC = "accounts.events.v1"


@pytest.fixture()
def issuer(tmp_path: Path) -> DataKeyRing:
    ring = DataKeyRing(tmp_path / "issuer")
    ring.ensure([TOPIC, "payments.events.v1"])
    return ring


def copy_for(issuer: DataKeyRing, service: str, tmp_path: Path) -> DataKeyRing:
    """What `bastion setup` hands SERVICE: the accounts topic's keys only (infra/personal-data.yaml)."""
    issuer.export_to(tmp_path / service, TOPIC)
    return DataKeyRing(tmp_path / service)


def test_a_sealed_address_opens_for_a_reader_of_the_accounts_topic_in_its_own_account_only(
    issuer: DataKeyRing, tmp_path: Path
) -> None:
    accounts, notifications = copy_for(issuer, "accounts", tmp_path), copy_for(issuer, "notifications", tmp_path)
    field = SealedForReaders(accounts).seal(OWNER_EMAIL, "acc-1", "alice@example.org")
    assert field.key_id == issuer.active(TOPIC)[0]
    assert decrypt_field(notifications, TOPIC, field_context(OWNER_EMAIL, "acc-1"), field) == "alice@example.org"
    with pytest.raises(FieldIntegrityError):
        decrypt_field(notifications, TOPIC, field_context(OWNER_EMAIL, "acc-2"), field)
