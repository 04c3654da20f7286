"""The whole dev stack: set-up, start in dependency order, health, status, stop and reset."""

import secrets
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bastion.devstack.backups import BackupKeys
from bastion.devstack.catalog import load_services
from bastion.devstack.components.base import Component
from bastion.devstack.components.kafka import Kafka
from bastion.devstack.components.keycloak import Keycloak
from bastion.devstack.components.postgres import ADMIN_ROLE, Postgres
from bastion.devstack.components.redis import ADMIN_USER, Redis
from bastion.devstack.components.service import built_services, service_component
from bastion.devstack.context import StackContext
from bastion.devstack.data_keys import DataKeys
from bastion.devstack.distributions import fetch, load_distributions, relocked
from bastion.devstack.errors import ComponentStartError
from bastion.devstack.event_access import EventAccessPolicy, load_policy
from bastion.devstack.identities import load_identities
from bastion.devstack.layout import StateLayout, write_private
from bastion.devstack.pki import DevPki
from bastion.devstack.prerequisites import (
    ensure_port_free,
    ensure_port_not_ephemeral,
    ephemeral_ports,
    find_java,
    find_redis_server,
)
from bastion.devstack.process import ProcessSupervisor, wait_until
from bastion.devstack.secrets import SecretNeeds, ensure_credentials, load_credentials
from bastion.events.keys import KeyRing
from bastion.events.personal_data import load_personal_data
from bastion.events.trust import load_trust_policy
from bastion.settings import DevstackSettings

# Started together within a phase, phases one after another: Keycloak keeps its data in PostgreSQL; the
# services need all four.
INFRA_PHASES: list[list[type[Component]]] = [[Postgres, Redis], [Kafka, Keycloak]]
COMPONENTS: list[type[Component]] = [kind for phase in INFRA_PHASES for kind in phase]
KAFKA_ADMIN = "admin"
AT_REST_KEY_BYTES = 32  # AES-256

Progress = Callable[[str], None]


# The detail of a service declared in infra/services.yaml whose server.py does not exist yet.
NOT_BUILT = "service not built yet"


class Stack:
    def __init__(self, settings: DevstackSettings, progress: Progress = print) -> None:
        self.settings = settings
        self.layout = StateLayout(settings.state_dir)
        self.supervisor = ProcessSupervisor(self.layout)
        self.progress = progress
        self.services = load_services(settings.infra_dir / "services.yaml")
        self.distributions = load_distributions(settings.infra_dir / "distributions.yaml")
        self.pki = DevPki(self.layout.pki_dir, settings.leaf_certificate_days, settings.reissue_when_days_left)
        services: list[type[Component]] = [service_component(n) for n in built_services(self.service_names)]
        self.phases: list[list[type[Component]]] = [*INFRA_PHASES, services] if services else INFRA_PHASES
        self.kinds: list[type[Component]] = [kind for phase in self.phases for kind in phase]

    @property
    def service_names(self) -> list[str]:
        return [service.name for service in self.services]

    def certificate_names(self) -> list[str]:
        return [*(kind.name for kind in COMPONENTS), *self.service_names, "cli"]

    def setup(self, relock: bool = False) -> StackContext:
        """Everything `up` needs that does not run: folders, secrets, certificates, distributions."""
        self.layout.ensure()
        identities = load_identities(self.settings.infra_dir / "keycloak" / "identities.yaml")
        policy = load_policy(self.settings.infra_dir / "event-access.yaml", set(self.service_names))
        load_trust_policy(self.settings.infra_dir / "event-trust.yaml", policy)
        needs = SecretNeeds(
            users=identities.user_names,
            keycloak_clients=self.service_names,
            kafka_principals=[KAFKA_ADMIN, *sorted(policy.principals | set(self.service_names))],
            postgres_roles=[ADMIN_ROLE, *self.service_names, "keycloak"],
            redis_users=[ADMIN_USER, *self.service_names],
        )
        credentials = ensure_credentials(self.layout.credentials_file, needs)
        KeyRing(self.layout.event_keys_dir).ensure(self.service_names)
        self._distribute_data_keys(policy)
        self._ensure_at_rest_keys()
        if BackupKeys(self.layout.backup_keys_dir).ensure():
            self.progress("backup keys generated (age identity and recipient, Ed25519 manifest key)")
        issued = self.pki.ensure(self.certificate_names())
        if issued:
            self.progress(f"certificates issued: {', '.join(issued)}")
        fetched: dict[str, Path] = {}
        for dist in self.distributions.values():
            started = time.monotonic()
            fetched[dist.name] = fetch(dist, self.settings.cache_dir, relock=relock)
            self.progress(f"{dist.name} {dist.version}: verified in {time.monotonic() - started:.1f}s")
        if relock:
            path = self.settings.infra_dir / "distributions.yaml"
            path.write_text(relocked(path, fetched))
            self.distributions = load_distributions(path)
        ctx = self.context(credentials)
        Keycloak(ctx).install(self.progress)
        return ctx

    def _distribute_data_keys(self, policy: EventAccessPolicy) -> None:
        """Give each service a copy of exactly the data keys of infra/personal-data.yaml it is entitled to."""
        self.data_keys(policy).ensure()

    def data_keys(self, policy: EventAccessPolicy | None = None) -> DataKeys:
        """The install's data keys of personal fields (bastion/devstack/data_keys.py)."""
        access = policy or load_policy(self.settings.infra_dir / "event-access.yaml", set(self.service_names))
        personal = load_personal_data(self.settings.infra_dir / "personal-data.yaml", access)
        return DataKeys(self.layout, personal, self.service_names)

    def _ensure_at_rest_keys(self) -> None:
        """One AES-256 key per service for the personal data it keeps at rest; never replaced once made,
        since a new key would make every sealed value unreadable."""
        for service in self.service_names:
            key_file = self.layout.at_rest_key(service)
            if not key_file.exists():
                key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                write_private(key_file, secrets.token_bytes(AT_REST_KEY_BYTES))

    def context(self, credentials: Any = None) -> StackContext:
        return StackContext(
            settings=self.settings,
            layout=self.layout,
            credentials=credentials or load_credentials(self.layout.credentials_file),
            pki=self.pki,
            services=self.services,
            distributions=self.distributions,
        )

    def components(self) -> list[Component]:
        ctx = self.context()
        return [kind(ctx) for kind in self.kinds]

    def up(self) -> None:
        """Start whatever is not running, wait until each is healthy, then (re)apply its bootstrap."""
        ctx = self.setup()
        self._check_prerequisites(ctx)
        for phase in self.phases:
            members = [kind(ctx) for kind in phase]
            started: dict[str, float] = {}
            for component in members:
                if self.supervisor.pid(component.name) is None:
                    self.supervisor.stop(component.name)  # what a crashed launcher left of its group
                    component.prepare()
                    self.supervisor.start(component.name, component.launch_spec())
                    started[component.name] = time.monotonic()
                    self.progress(f"{component.name}: starting")
            for component in members:
                self._await_healthy(component)
                component.bootstrap()
                since = started.get(component.name)
                took = f" in {time.monotonic() - since:.1f}s" if since else " (already running)"
                self.progress(f"{component.name}: healthy{took}")

    def _check_prerequisites(self, ctx: StackContext) -> None:
        """Fail before anything starts: a missing Java, PostgreSQL or Redis, a port another process holds or any
        outgoing connection could."""
        find_java(self.settings.java_home)
        find_redis_server()
        ephemeral = ephemeral_ports()
        for component in (kind(ctx) for kind in self.kinds):
            for port in component.ports():
                ensure_port_not_ephemeral(port, component.name, ephemeral)
            if isinstance(component, Postgres):
                _ = component.bin_dir
            if self.supervisor.pid(component.name) is None:
                self.supervisor.stop(component.name)
                for port in component.ports():
                    ensure_port_free(self.settings.bind_host, port, component.name)

    def _await_healthy(self, component: Component) -> None:
        deadline = time.monotonic() + self.settings.start_timeout_seconds

        def ready() -> bool:
            if self.supervisor.pid(component.name) is None:
                raise ComponentStartError(
                    f"{component.name} exited during start-up; last lines of its log:\n"
                    f"{self.supervisor.exit_detail(component.name)}",
                    f"read {self.layout.log_file(component.name)}; `bastion reset` starts from a clean state",
                )
            return component.probe()

        if not wait_until(ready, deadline, interval=0.5):
            raise ComponentStartError(
                f"{component.name} did not become healthy within {self.settings.start_timeout_seconds:.0f}s; "
                f"last lines of its log:\n{self.supervisor.exit_detail(component.name)}",
                f"read {self.layout.log_file(component.name)}",
            )

    def down(self) -> list[str]:
        """Stop every component, phase by phase in the reverse of their start (the services before Kafka, which they
        publish their last decisions to; Keycloak before PostgreSQL). The components of one phase stop together: none
        of them waits on another, and each may take seconds to wind down (a service's workers, Kafka's log)."""
        stopped = []
        for phase in reversed(self.phases):
            kinds = list(reversed(phase))
            with ThreadPoolExecutor(max_workers=max(len(kinds), 1)) as pool:
                outcomes = list(pool.map(lambda kind: self.supervisor.stop(kind.name), kinds))
            for kind, was_running in zip(kinds, outcomes, strict=True):
                if was_running:
                    stopped.append(kind.name)
                    self.progress(f"{kind.name}: stopped")
        return stopped

    def status(self) -> dict[str, Any]:
        """The `bastion status --json` document (a contract: docs/contracts.md)."""
        components: dict[str, dict[str, Any]] = {}
        installed = self.layout.credentials_file.exists()
        for component in self.components() if installed else []:
            pid = self.supervisor.pid(component.name)
            components[component.name] = {"healthy": pid is not None and component.probe(), "pid": pid,
                                          **component.describe()}
        for kind in self.kinds if not installed else []:
            components[kind.name] = {"healthy": False, "pid": None, "detail": "not set up: run `make setup`"}
        for service in (s for s in self.services if s.name not in components):
            components[service.name] = {
                "healthy": False,
                "pid": None,
                "grpc": f"{self.settings.public_host}:{self.settings.service_port(service.grpc_port)}",
                "detail": NOT_BUILT,
            }
        return {
            "state_dir": str(self.layout.root),
            "pki_dir": str(self.layout.pki_dir),
            "credentials_file": str(self.layout.credentials_file),
            "components": components,
        }

    def reset(self) -> None:
        self.down()
        if self.layout.root.exists():
            shutil.rmtree(self.layout.root)
            self.progress(f"removed {self.layout.root}")
