"""Redis from the system's `redis-server` (Debian: `apt-get install redis-server`, built with TLS): TLS only on
loopback, no plaintext port, the default user disabled, one ACL user per service confined to its key prefix.
Clients reach it with `StackContext.redis_options` (TLS checked against the dev CA, ACL user and password)."""

from pathlib import Path

import redis

from bastion.devstack.components.base import Component
from bastion.devstack.layout import write_private
from bastion.devstack.prerequisites import find_redis_server
from bastion.devstack.process import LaunchSpec

ADMIN_USER = "admin"


def acl_lines(service_passwords: dict[str, str], admin_password: str) -> list[str]:
    """The ACL file: no anonymous access; each service confined to its own key prefix, no admin commands, and
    nothing that would tell it the names of other services' keys: no SCAN or RANDOMKEY, and no CLIENT TRACKING,
    whose broadcast mode (RESP3) pushes the name of every key any user changes (Redis checks no key pattern there
    before 7.4's fix; removing a subcommand needs Redis 7)."""
    lines = ["user default off", f"user {ADMIN_USER} on >{admin_password} ~* &* +@all"]
    for name, password in sorted(service_passwords.items()):
        lines.append(f"user {name} on >{password} resetchannels ~{name}:* &{name}:* +@all -@dangerous "
                     "-scan -randomkey -client|tracking")
    return lines


class Redis(Component):
    name = "redis"

    def ports(self) -> list[int]:
        return [self.ctx.settings.redis_port]

    @property
    def conf_dir(self) -> Path:
        return self.ctx.layout.component_conf(self.name)

    def prepare(self) -> None:
        creds = self.ctx.credentials.redis
        services = {name: creds[name] for name in self.ctx.service_names}
        write_private(self.conf_dir / "users.acl", "\n".join(acl_lines(services, creds[ADMIN_USER])) + "\n")
        data = self.ctx.layout.component_data(self.name)
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
        settings = self.ctx.settings
        tls = self.ctx.pki.paths(self.name)
        config = [
            f"bind {settings.bind_host}",
            "protected-mode yes",
            "port 0",  # no plaintext listener
            f"tls-port {settings.redis_port}",
            f"tls-cert-file {tls.cert}",
            f"tls-key-file {tls.key}",
            f"tls-ca-cert-file {self.ctx.ca_file}",
            "tls-auth-clients no",  # clients prove who they are with their ACL user and password, as with PostgreSQL
            'tls-protocols "TLSv1.3"',  # as Kafka, Keycloak and PostgreSQL
            f"dir {data}",
            "appendonly yes",
            f"aclfile {self.conf_dir / 'users.acl'}",
            "daemonize no",
            "maxmemory 128mb",
            "maxmemory-policy noeviction",
        ]
        write_private(self.conf_dir / "redis.conf", "\n".join(config) + "\n")

    def launch_spec(self) -> LaunchSpec:
        return LaunchSpec(argv=[str(find_redis_server()), str(self.conf_dir / "redis.conf")])

    def client(self, user: str, password: str) -> redis.Redis:
        return redis.Redis(**self.ctx.redis_options(user, password), socket_connect_timeout=2, socket_timeout=2)

    def probe(self) -> bool:
        try:
            return bool(self.client(ADMIN_USER, self.ctx.credentials.redis[ADMIN_USER]).ping())
        except redis.RedisError:
            return False

    def describe(self) -> dict[str, object]:
        return {"address": f"{self.ctx.settings.public_host}:{self.ctx.settings.redis_port}", "tls": True}
