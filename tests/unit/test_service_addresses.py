"""Where each declared service listens: infra/services.yaml's ports plus the install's offset, in one place."""

from pathlib import Path

import pytest

from bastion.devstack.catalog import ServiceEntry, load_services
from bastion.devstack.context import StackContext
from bastion.devstack.errors import DevstackError
from bastion.devstack.layout import StateLayout
from bastion.devstack.pki import DevPki
from bastion.devstack.secrets import Credentials
from bastion.settings import PROJECT_ROOT, DevstackSettings


def context(tmp_path: Path, offset: int, services: list[ServiceEntry]) -> StackContext:
    settings = DevstackSettings(state_dir=tmp_path, service_port_offset=offset, public_host="localhost")
    return StackContext(settings=settings, layout=StateLayout(tmp_path), credentials=Credentials.from_json("{}"),
                        pki=DevPki(tmp_path / "pki", 7, 2), services=services, distributions={})


def test_the_offset_of_the_install_is_added_to_every_declared_port(tmp_path: Path) -> None:
    ctx = context(tmp_path, 10000, [ServiceEntry("ledger", 50061, 9461)])
    assert ctx.grpc_port("ledger") == 60061
    assert ctx.metrics_port("ledger") == 19461
    assert ctx.grpc_address("ledger") == "localhost:60061"


def test_the_dev_install_serves_the_declared_ports_unchanged() -> None:
    services = load_services(PROJECT_ROOT / "infra" / "services.yaml")
    settings = DevstackSettings(service_port_offset=0)
    assert [settings.service_port(service.grpc_port) for service in services] == [s.grpc_port for s in services]


def test_an_undeclared_service_is_named_in_the_error(tmp_path: Path) -> None:
    ctx = context(tmp_path, 0, [ServiceEntry("ledger", 50061, 9461)])
    with pytest.raises(DevstackError, match="no service 'ledgr'") as refused:
        ctx.grpc_address("ledgr")
    assert refused.value.remedy == "the declared services are ledger"
