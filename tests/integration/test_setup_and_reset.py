"""`bastion setup` on a machine that lacks something ends with one clear message, never a stack trace;
`bastion reset` wipes an install only when confirmed."""

import os
import shutil
import sys
from pathlib import Path

import yaml

from bastion.devstack.distributions import fetch, load_distributions
from bastion.devstack.layout import StateLayout
from bastion.devstack.secrets import SecretNeeds, ensure_credentials
from bastion.settings import PROJECT_ROOT, DevstackSettings
from tests.integration.conftest import bastion


def isolated(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"BASTION_STATE_DIR": str(tmp_path / "state"), "BASTION_CACHE_DIR": str(tmp_path / "cache"), **extra}


def assert_clear_failure(result: object, *phrases: str) -> None:
    stdout, stderr, code = result.stdout, result.stderr, result.returncode  # type: ignore[attr-defined]
    assert code == 2, stdout + stderr
    for phrase in phrases:
        assert phrase in stderr, stderr
    assert "Traceback" not in stdout + stderr


def test_no_maven(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(sys.executable, bin_dir / "python3")
    result = bastion("setup", env={**isolated(tmp_path), "PATH": str(bin_dir)})
    assert_clear_failure(result, "Maven (`mvn`) is not installed", "install Maven")


def test_download_that_fails(tmp_path: Path) -> None:
    infra = tmp_path / "infra"
    shutil.copytree(PROJECT_ROOT / "infra", infra)
    pins = yaml.safe_load((infra / "distributions.yaml").read_text())
    pins["kafka"]["maven"] = ["org.apache.kafka:kafka_2.13:0.0.0-does-not-exist"]
    (infra / "distributions.yaml").write_text(yaml.safe_dump(pins))
    result = bastion("setup", env=isolated(tmp_path, BASTION_INFRA_DIR=str(infra)))
    assert_clear_failure(result, "Maven could not fetch kafka", "check the network connection")


def test_tampered_download_is_refused(tmp_path: Path) -> None:
    settings = DevstackSettings()
    pinned = fetch(load_distributions(settings.infra_dir / "distributions.yaml")["kafka"], settings.cache_dir)
    cache = tmp_path / "cache"
    shutil.copytree(pinned, cache / "kafka-4.1.1")
    with open(cache / "kafka-4.1.1" / "kafka-clients-4.1.1.jar", "ab") as jar:
        jar.write(b"\0")
    result = bastion("setup", env=isolated(tmp_path))
    assert_clear_failure(result, "kafka-clients-4.1.1.jar has SHA-256", "tampered")


def test_reset_wipes_the_state_folder_only_when_confirmed(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path / "state")
    layout.ensure()
    ensure_credentials(layout.credentials_file, SecretNeeds(["alice"], [], [], [], []))
    refused = bastion("reset", env=isolated(tmp_path))
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert layout.credentials_file.exists()
    wiped = bastion("reset", "--yes", env=isolated(tmp_path))
    assert wiped.returncode == 0, wiped.stderr
    assert not layout.root.exists()
