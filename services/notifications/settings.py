"""The notifications service's own settings (BASTION_NOTIFICATIONS_* environment), built once in server.py."""

from pydantic_settings import BaseSettings, SettingsConfigDict


class NotificationsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BASTION_NOTIFICATIONS_", frozen=True)

    # How often an open stream looks for new notifications (the consumer may run in another process).
    stream_poll_seconds: float = 0.5
