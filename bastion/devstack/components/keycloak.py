"""Keycloak 26 in production mode: HTTPS only with the dev CA certificate, data in PostgreSQL, realm
`bastion` imported from infra/keycloak/identities.yaml at the first start."""

import json
import os
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from keycloak import KeycloakAdmin
from keycloak.exceptions import KeycloakError

from bastion.devstack.components.base import Component
from bastion.devstack.errors import ComponentStartError
from bastion.devstack.identities import Identities, load_identities
from bastion.devstack.layout import write_private
from bastion.devstack.prerequisites import find_java
from bastion.devstack.process import LaunchSpec
from bastion.devstack.realm import render_realm
from bastion.devstack.realm_upgrade import upgrade_realm

# Options baked into the optimized server image by `kc.sh build`; changing them triggers a rebuild.
BUILD_OPTIONS = ["--db=postgres", "--health-enabled=true"]
BOOTSTRAP_ADMIN = "admin"


class Keycloak(Component):
    name = "keycloak"

    @property
    def home(self) -> Path:
        return self.ctx.layout.dist_dir / f"keycloak-{self.ctx.distributions['keycloak'].version}"

    @property
    def server_url(self) -> str:
        """Where clients reach Keycloak (python-keycloak's `server_url`): HTTPS on the public host."""
        return f"https://{self.ctx.settings.public_host}:{self.ctx.settings.keycloak_port}/"

    @property
    def issuer(self) -> str:
        return f"{self.server_url}realms/{self.realm_name}"

    @property
    def realm_name(self) -> str:
        return self._identities().realm

    @property
    def access_token_lifespan_seconds(self) -> int:
        return self._identities().access_token_lifespan_seconds

    def _identities(self) -> Identities:
        return load_identities(
            self.ctx.settings.infra_dir / "keycloak" / "identities.yaml", set(self.ctx.service_names)
        )

    def ports(self) -> list[int]:
        return [self.ctx.settings.keycloak_port, self.ctx.settings.keycloak_management_port]

    def _java_env(self) -> dict[str, str]:
        java = find_java(self.ctx.settings.java_home)
        return {"JAVA_HOME": str(java.parent.parent), "JAVA": str(java)}

    def install(self, progress: Callable[[str], None]) -> None:
        """Unpack the verified distribution into the state folder and build the optimized server once."""
        marker = self.home / ".bastion-build"
        if marker.exists() and marker.read_text() == " ".join(BUILD_OPTIONS):
            return
        dist = self.ctx.distributions["keycloak"]
        archive = self.ctx.distribution_dir("keycloak") / f"keycloak-quarkus-dist-{dist.version}.zip"
        if self.home.exists():
            shutil.rmtree(self.home)
        progress(f"keycloak: unpacking {dist.version} and building the optimized server (once per install)")
        staging = self.home.parent / f".{self.home.name}.unpack"
        shutil.rmtree(staging, ignore_errors=True)
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(staging)
        (staging / f"keycloak-{dist.version}").rename(self.home)
        staging.rmdir()
        for script in (self.home / "bin").glob("*.sh"):
            script.chmod(0o755)
        result = subprocess.run(
            [str(self.home / "bin" / "kc.sh"), "build", *BUILD_OPTIONS],
            env={**os.environ, **self._java_env()}, capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            raise ComponentStartError(
                f"`kc.sh build` failed:\n{(result.stdout + result.stderr).strip()[-1200:]}",
                f"check the Java installation; the unpacked server is in {self.home}",
            )
        marker.write_text(" ".join(BUILD_OPTIONS))

    def prepare(self) -> None:
        import_dir = self.home / "data" / "import"
        import_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(import_dir, 0o700)
        realm = render_realm(self._identities(), self.ctx.credentials)
        write_private(import_dir / f"realm-{realm['realm']}.json", json.dumps(realm, indent=2))

    def launch_spec(self) -> LaunchSpec:
        s = self.ctx.settings
        pki = self.ctx.pki.paths(self.name)
        db_url = (
            f"jdbc:postgresql://{s.public_host}:{s.postgres_port}/keycloak"
            f"?sslmode=verify-full&sslrootcert={self.ctx.ca_file}"
        )
        env = {
            **self._java_env(),
            "KC_BOOTSTRAP_ADMIN_USERNAME": BOOTSTRAP_ADMIN,
            "KC_BOOTSTRAP_ADMIN_PASSWORD": self.ctx.credentials.keycloak_admin[BOOTSTRAP_ADMIN],
            "KC_DB_URL": db_url,
            "KC_DB_USERNAME": "keycloak",
            "KC_DB_PASSWORD": self.ctx.credentials.postgres["keycloak"],
            "JAVA_OPTS_KC_HEAP": s.keycloak_heap,
        }
        argv = [
            str(self.home / "bin" / "kc.sh"), "start", "--optimized",
            "--cache=local",
            "--http-enabled=false",
            f"--http-host={s.bind_host}",
            f"--https-port={s.keycloak_port}",
            f"--https-certificate-file={pki.cert}",
            f"--https-certificate-key-file={pki.key}",
            "--https-protocols=TLSv1.3",
            f"--hostname=https://{s.public_host}:{s.keycloak_port}",
            f"--http-management-port={s.keycloak_management_port}",
            "--import-realm",
        ]
        return LaunchSpec(argv=argv, env=env, cwd=self.home)

    def bootstrap(self) -> None:
        """Give a realm imported by an earlier release what the services rely on now (realm_upgrade.py): the import
        skips an existing realm. Only what is missing is added."""
        s = self.ctx.settings
        try:
            admin = KeycloakAdmin(server_url=f"https://{s.public_host}:{s.keycloak_port}/", username=BOOTSTRAP_ADMIN,
                                  password=self.ctx.credentials.keycloak_admin[BOOTSTRAP_ADMIN],
                                  realm_name=self.realm_name, user_realm_name="master", verify=str(self.ctx.ca_file))
            upgrade_realm(admin, self._identities(), render_realm(self._identities(), self.ctx.credentials))
        except KeycloakError as error:
            raise ComponentStartError(
                f"the realm {self.realm_name!r} could not be brought up to date: {error}",
                "check keycloak.log in the state folder's logs; `bastion reset` imports the realm afresh",
            ) from None

    def probe(self) -> bool:
        s = self.ctx.settings
        context = ssl.create_default_context(cafile=str(self.ctx.ca_file))
        url = f"https://{s.public_host}:{s.keycloak_management_port}/health/ready"
        try:
            with urllib.request.urlopen(url, context=context, timeout=3) as response:
                return bool(json.load(response).get("status") == "UP")
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def describe(self) -> dict[str, Any]:
        return {"issuer": self.issuer}
