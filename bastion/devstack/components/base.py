"""The shape every devstack component has: prepare, launch, probe, bootstrap, describe."""

from abc import ABC, abstractmethod
from typing import Any

from bastion.devstack.context import StackContext
from bastion.devstack.process import LaunchSpec


class Component(ABC):
    """A server the devstack runs. Every step is idempotent, so `bastion up` can repeat them safely."""

    name: str

    def __init__(self, ctx: StackContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def ports(self) -> list[int]:
        """The loopback ports this component listens on (checked free before it starts)."""

    def prepare(self) -> None:  # noqa: B027 - most components need no preparation
        """Write configuration and initialise data, before the first start or any later one."""

    @abstractmethod
    def launch_spec(self) -> LaunchSpec:
        """The command that runs the server in the foreground (the supervisor detaches it)."""

    @abstractmethod
    def probe(self) -> bool:
        """True when the server answers an authenticated request now."""

    def bootstrap(self) -> None:  # noqa: B027 - not every component has principals to create
        """Create or update principals and resources once healthy (roles, users, topics, ACLs)."""

    def describe(self) -> dict[str, Any]:
        """Extra fields for `bastion status --json` (an address, an issuer)."""
        return {}
