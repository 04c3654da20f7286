"""The audit service's own settings (BASTION_AUDIT_* environment), built once in server.py."""

from pydantic_settings import BaseSettings, SettingsConfigDict

from bastion.audit.install_tools import ORIGIN


class AuditSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BASTION_AUDIT_", frozen=True)

    # A checkpoint is signed after this many new records, or this many seconds with at least one new record.
    # Together they bound the window in which a rewrite of the newest records is not yet detectable.
    checkpoint_every_records: int = 1000
    checkpoint_every_seconds: float = 10.0
    # Names this log in every checkpoint, so a checkpoint of another install's log never verifies here.
    origin: str = ORIGIN
