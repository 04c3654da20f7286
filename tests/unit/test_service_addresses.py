"""Where each declared service listens: infra/services.yaml's ports plus the install's offset, in one place; a
catalog that declares no service or an incomplete one is refused; and how a client reaches Redis."""

import ssl
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


def test_the_test_installs_ports_are_all_distinct_from_each_other_and_from_the_dev_installs() -> None:
    services = load_services(PROJECT_ROOT / "infra" / "services.yaml")
    declared = [port for service in services for port in (service.grpc_port, service.metrics_port)]
    shifted = [DevstackSettings(service_port_offset=10000).service_port(port) for port in declared]
    assert shifted == [port + 10000 for port in declared]
    assert len(set(declared) | set(shifted)) == 2 * len(declared)


def test_an_undeclared_service_is_named_in_the_error(tmp_path: Path) -> None:
    ctx = context(tmp_path, 0, [ServiceEntry("ledger", 50061, 9461)])
    with pytest.raises(DevstackError, match="no service 'ledgr'") as refused:
        ctx.grpc_address("ledgr")
    assert refused.value.remedy == "the declared services are ledger"


def test_a_catalog_without_services_or_with_an_incomplete_entry_is_refused(tmp_path: Path) -> None:
    catalog = tmp_path / "services.yaml"
    catalog.write_text("services: {}\n")
    with pytest.raises(DevstackError, match="declares no services"):
        load_services(catalog)
    catalog.write_text("services:\n  ledger: {grpc_port: 50061}\n")
    with pytest.raises(DevstackError, match="a service entry is incomplete") as refused:
        load_services(catalog)
    assert "metrics_port" in refused.value.remedy


def test_redis_is_reached_over_tls_1_3_checking_the_dev_ca_and_the_servers_name(tmp_path: Path) -> None:
    options = context(tmp_path, 0, []).redis_options("ledger", "pw")
    assert options["ssl"] is True and options["ssl_check_hostname"] is True
    assert options["ssl_ca_certs"] == str(tmp_path / "pki" / "ca.pem")
    assert options["ssl_min_version"] == ssl.TLSVersion.TLSv1_3
    assert (options["host"], options["username"], options["password"]) == ("localhost", "ledger", "pw")
