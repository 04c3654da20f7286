"""Apache Kafka 4 in KRaft combined mode, secured from the first start.

Clients: SASL_SSL with SCRAM-SHA-512 only. Controller: TLS with client certificates required. No PLAINTEXT
listener, StandardAuthorizer with default deny, super users only the admin principal and the broker's own
certificate. Topics and ACLs come from infra/event-access.yaml (see `kafka_admin`).
"""

import base64
import logging
import subprocess
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from bastion.devstack.components.base import Component
from bastion.devstack.errors import ComponentStartError
from bastion.devstack.event_access import load_policy
from bastion.devstack.kafka_admin import ADMIN, BROKER_PRINCIPAL, KafkaAdmin, client_config
from bastion.devstack.layout import write_private
from bastion.devstack.pki import ORGANIZATION
from bastion.devstack.prerequisites import find_java
from bastion.devstack.process import LaunchSpec

# Java renders the certificate subject in RFC 2253 order; map "CN=NAME,O=<dev org>" to the principal NAME.
PRINCIPAL_MAPPING = f"RULE:^CN=([^,]+),O={ORGANIZATION}$/$1/,DEFAULT"
JVM_FLAGS = ["-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true", "-Dlog4j2.shutdownHookEnabled=false"]
LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <RollingFile name="server" fileName="{logs}/server.log" filePattern="{logs}/server.log.%i">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
      <Policies><SizeBasedTriggeringPolicy size="50MB"/></Policies><DefaultRolloverStrategy max="3"/>
    </RollingFile>
    <RollingFile name="authorizer" fileName="{logs}/authorizer.log" filePattern="{logs}/authorizer.log.%i">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
      <Policies><SizeBasedTriggeringPolicy size="20MB"/></Policies><DefaultRolloverStrategy max="2"/>
    </RollingFile>
  </Appenders>
  <Loggers>
    <Root level="INFO"><AppenderRef ref="server"/></Root>
    <Logger name="kafka.authorizer.logger" level="INFO" additivity="false"><AppenderRef ref="authorizer"/></Logger>
  </Loggers>
</Configuration>
"""
quiet_librdkafka = logging.getLogger("bastion.devstack.kafka.librdkafka")


def java_argument_file(arguments: list[str]) -> str:
    """ARGUMENTS as a java launcher argument file (`java @FILE`): one per line, each quoted, with backslashes and
    quotes escaped, so that spaces or quotes in an argument never split or end it."""
    def quoted(argument: str) -> str:
        if "\n" in argument or "\r" in argument:
            raise ValueError("an argument file cannot carry a line break in an argument")
        return '"' + argument.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "".join(quoted(argument) + "\n" for argument in arguments)


def new_cluster_id() -> str:
    """A random KRaft cluster id: 16 bytes in URL-safe base64 without padding, never starting with "-" (as Kafka's
    own Uuid.randomUuid ensures), which the storage tool would read as an option: one id in 64 did, and `bastion
    up` failed on a fresh install."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


class Kafka(Component):
    name = "kafka"

    @property
    def conf_dir(self) -> Path:
        return self.ctx.layout.component_conf(self.name)

    @property
    def data_dir(self) -> Path:
        return self.ctx.layout.component_data(self.name)

    @property
    def bootstrap_address(self) -> str:
        return f"{self.ctx.settings.public_host}:{self.ctx.settings.kafka_port}"

    def ports(self) -> list[int]:
        return [self.ctx.settings.kafka_port, self.ctx.settings.kafka_controller_port]

    def server_properties(self) -> dict[str, str]:
        s = self.ctx.settings
        admin_password = self.ctx.credentials.kafka[ADMIN]
        return {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"{s.public_host}:{s.kafka_controller_port}",
            "controller.listener.names": "CONTROLLER",
            "listeners": f"CLIENT://{s.bind_host}:{s.kafka_port},CONTROLLER://{s.bind_host}:{s.kafka_controller_port}",
            "advertised.listeners": f"CLIENT://{s.public_host}:{s.kafka_port}",
            "listener.security.protocol.map": "CLIENT:SASL_SSL,CONTROLLER:SSL",
            "inter.broker.listener.name": "CLIENT",
            "sasl.enabled.mechanisms": "SCRAM-SHA-512",
            "sasl.mechanism.inter.broker.protocol": "SCRAM-SHA-512",
            "listener.name.client.scram-sha-512.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required "
                f'username="{ADMIN}" password="{admin_password}";'
            ),
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(self.conf_dir / "keystore.pem"),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.ctx.ca_file),
            "ssl.endpoint.identification.algorithm": "https",
            "ssl.enabled.protocols": "TLSv1.3",
            "ssl.protocol": "TLSv1.3",
            "ssl.client.auth": "none",
            "listener.name.controller.ssl.client.auth": "required",
            "ssl.principal.mapping.rules": PRINCIPAL_MAPPING,
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "allow.everyone.if.no.acl.found": "false",
            "super.users": f"User:{ADMIN};User:{BROKER_PRINCIPAL}",
            "log.dirs": str(self.data_dir),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "3",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "3",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "delete.topic.enable": "true",
        }

    def _java(self, main: str, *args: str, heap: str = "-Xmx256m") -> list[str]:
        """The java command running MAIN with ARGS (MAIN may be an `@FILE` argument file naming both)."""
        java = find_java(self.ctx.settings.java_home)
        classpath = str(self.ctx.distribution_dir("kafka") / "*")
        return [
            str(java), *heap.split(), *JVM_FLAGS, f"-Dlog4j2.configurationFile={self.conf_dir / 'log4j2.xml'}",
            "-cp", classpath, main, *args,
        ]

    def prepare(self) -> None:
        paths = self.ctx.pki.paths(BROKER_PRINCIPAL)
        write_private(self.conf_dir / "keystore.pem", paths.key.read_bytes() + paths.cert.read_bytes())
        properties = "".join(f"{key}={value}\n" for key, value in self.server_properties().items())
        write_private(self.conf_dir / "server.properties", properties)
        logs = self.ctx.layout.log_dir / "kafka"
        logs.mkdir(parents=True, exist_ok=True)
        (self.conf_dir / "log4j2.xml").write_text(LOG4J2.format(logs=logs))
        if not (self.data_dir / "meta.properties").exists():
            self._format()

    def _format(self) -> None:
        """Format the KRaft log once, creating the admin's SCRAM credential before the broker first runs."""
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cluster_id = new_cluster_id()
        admin_scram = f"SCRAM-SHA-512=[name={ADMIN},password={self.ctx.credentials.kafka[ADMIN]}]"
        # The tool and its arguments go in a 0600 argument file that the java launcher reads (`java ... @FILE`), not
        # on the command line, which any local user reads (`ps`, /proc/PID/cmdline) while the tool runs.
        arguments = self.conf_dir / "format.args"
        write_private(arguments, java_argument_file([
            "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(self.conf_dir / "server.properties"),
            "--standalone", "--add-scram", admin_scram,
        ]))
        try:
            argv = self._java(f"@{arguments}")
            result = subprocess.run(argv, capture_output=True, text=True, check=False)
        finally:
            arguments.unlink(missing_ok=True)
        if result.returncode != 0:
            raise ComponentStartError(
                f"formatting Kafka's storage failed:\n{(result.stdout + result.stderr).strip()[-800:]}",
                "run `bastion reset` to start from a clean state folder",
            )

    def launch_spec(self) -> LaunchSpec:
        argv = self._java("kafka.Kafka", str(self.conf_dir / "server.properties"), heap=self.ctx.settings.kafka_heap)
        return LaunchSpec(argv=argv, cwd=self.data_dir)

    def client_config(self, user: str, password: str) -> dict[str, Any]:
        return {**client_config(self.bootstrap_address, str(self.ctx.ca_file), user, password),
                "logger": quiet_librdkafka}

    def admin(self) -> KafkaAdmin:
        return KafkaAdmin(self.client_config(ADMIN, self.ctx.credentials.kafka[ADMIN]))

    def probe(self) -> bool:
        client = AdminClient(self.client_config(ADMIN, self.ctx.credentials.kafka[ADMIN]))
        try:
            client.list_topics(timeout=3)
            return True
        except KafkaException:
            return False

    def bootstrap(self) -> None:
        policy = load_policy(self.ctx.settings.infra_dir / "event-access.yaml", set(self.ctx.service_names))
        admin = self.admin()
        services = set(self.ctx.service_names)
        admin.sync_scram_users({name: self.ctx.credentials.kafka[name] for name in sorted(services)})
        admin.ensure_topics(policy)
        admin.sync_acls(policy.grants())

    def describe(self) -> dict[str, Any]:
        return {"bootstrap": self.bootstrap_address}
