"""The payments service's own settings (prefix BASTION_PAYMENTS_), read once by server.py."""

from pydantic_settings import BaseSettings, SettingsConfigDict


class PaymentsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BASTION_PAYMENTS_", frozen=True)

    daily_limit_minor: int = 1_000_000            # 10,000.00 per source account and UTC day
    velocity_count: int = 120                      # transfers per source account ...
    velocity_window_seconds: int = 60              # ... in this many seconds
    step_up_above_minor: int = 100_000             # above 1,000.00 the user's session is checked online
    lock_ttl_seconds: float = 10.0
    accounts_deadline_seconds: float = 5.0
    breaker_fail_max: int = 5
    breaker_reset_seconds: float = 10.0
    # A payment still PENDING after the grace period is settled by the reconciler (same idempotency key).
    pending_grace_seconds: float = 60.0
    reconcile_every_seconds: float = 30.0
