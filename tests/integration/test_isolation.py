"""The integration suite's install is apart from the developer's: its own state folder (so its own generated
secrets, certificates and data) and its own ports, none shared with the dev install's defaults."""

from bastion.devstack.catalog import load_services
from bastion.settings import DevstackSettings

PORT_FIELDS = ("postgres_port", "redis_port", "kafka_port", "kafka_controller_port", "keycloak_port",
               "keycloak_management_port")


def ports_of(settings: DevstackSettings) -> set[int]:
    ports = {getattr(settings, name) for name in PORT_FIELDS}
    for service in load_services(settings.infra_dir / "services.yaml"):
        ports |= {settings.service_port(service.grpc_port), settings.service_port(service.metrics_port)}
    return ports


def test_the_test_install_shares_no_port_with_the_dev_install(settings: DevstackSettings) -> None:
    dev, test = ports_of(DevstackSettings()), ports_of(settings)
    assert len(test) == len(PORT_FIELDS) + 2 * len(load_services(settings.infra_dir / "services.yaml"))
    assert not dev & test, f"shared ports: {sorted(dev & test)}"


def test_the_test_install_keeps_its_state_and_secrets_apart(settings: DevstackSettings) -> None:
    dev, test = DevstackSettings().state_dir.resolve(), settings.state_dir.resolve()
    assert not test.is_relative_to(dev) and not dev.is_relative_to(test)
