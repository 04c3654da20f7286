"""Settings of the devstack, read once from the environment (prefix BASTION_) by the entry point."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class DevstackSettings(BaseSettings):
    """Where the dev install keeps its state and which loopback ports its components use."""

    model_config = SettingsConfigDict(env_prefix="BASTION_", frozen=True)

    state_dir: Path = PROJECT_ROOT / ".state"
    cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "bastion")
    infra_dir: Path = PROJECT_ROOT / "infra"
    bind_host: str = "127.0.0.1"
    public_host: str = "localhost"

    postgres_port: int = 15432
    redis_port: int = 16379
    kafka_port: int = 19092
    kafka_controller_port: int = 19093
    keycloak_port: int = 18443
    keycloak_management_port: int = 18444
    # Added to each service's gRPC and metrics ports of infra/services.yaml (the test stack uses 10000).
    service_port_offset: int = 0
    dev_profile: bool = True

    def service_port(self, declared: int) -> int:
        """Where a service port declared in infra/services.yaml listens in this install (its offset added)."""
        return declared + self.service_port_offset

    java_home: Path | None = None
    postgres_bin_dir: Path | None = None
    kafka_heap: str = "-Xms128m -Xmx512m"
    keycloak_heap: str = "-Xms64m -Xmx512m"

    leaf_certificate_days: int = 7
    reissue_when_days_left: int = 2
    start_timeout_seconds: float = 180.0
    # A verifying consumer reports a sequence gap still open after this long (bastion/events/consumer.py).
    sequence_gap_alert_seconds: float = Field(default=30.0, gt=0, le=86_400)
    # The share of new traces (calls that arrive without a caller's trace) whose spans the services record; a
    # caller's sampled trace is always recorded (bastion/grpc/spans.py).
    trace_sample_ratio: float = Field(default=0.0, ge=0, le=1)
    # The most spans a service records in a second, whatever its callers ask (bastion/grpc/spans.py).
    trace_spans_per_second: float = Field(default=100.0, gt=0, le=100_000)
    # HOST:PORT of an OpenTelemetry collector's OTLP/gRPC receiver: the services send it their spans as well, over
    # mutual TLS only (the dev CA verifies the collector, which sees the service's certificate). Empty: none.
    trace_otlp_endpoint: str = Field(default="", pattern=r"^$|^[A-Za-z0-9.-]{1,253}:[0-9]{1,5}$")
