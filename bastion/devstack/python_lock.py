"""The hash lock of Bastion's Python packages (requirements.lock) and the install that enforces it
(scripts/install_locked_deps.sh, run by `make setup`; docs/dependencies.md)."""

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bastion.settings import PROJECT_ROOT

LOCK_FILE = PROJECT_ROOT / "requirements.lock"
INSTALL_SCRIPT = PROJECT_ROOT / "scripts" / "install_locked_deps.sh"


class LockError(ValueError):
    """A lock entry that is not one package pinned to one version."""


@dataclass(frozen=True)
class LockEntry:
    name: str  # canonical (PEP 503)
    version: str
    marker: Marker | None
    hashes: tuple[str, ...]  # "sha256:HEX", as the lock writes them
    text: str  # the entry as one line, as pip reads it

    def applies(self) -> bool:
        """Whether the entry is installed on this interpreter and platform."""
        return self.marker is None or self.marker.evaluate()


def read_lock(text: str) -> list[LockEntry]:
    """The lock's entries: one logical line per package (continuations joined), comments dropped."""
    entries = []
    for raw in text.replace("\\\n", " ").splitlines():
        line = " ".join(raw.split("#", 1)[0].split())
        if not line:
            continue
        words = line.split(" --hash=")
        try:
            requirement = Requirement(words[0])
        except ValueError as error:
            raise LockError(f"not a requirement: {line[:120]!r} ({error})") from None
        specs = list(requirement.specifier)
        if len(specs) != 1 or specs[0].operator != "==":
            raise LockError(f"not pinned to one version: {words[0]!r}")
        entries.append(LockEntry(canonicalize_name(requirement.name), specs[0].version, requirement.marker,
                                 tuple(words[1:]), line))
    return entries


def install_offline(venv: Path, lock: Path, index: Path, script: Path = INSTALL_SCRIPT,
                    timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the install script into VENV with LOCK, pip finding packages only in the folder INDEX (a stand-in
    for the package index: no network)."""
    environment = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(index), "PIP_NO_CACHE_DIR": "1",
                   "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return subprocess.run(["bash", str(script), str(venv), str(lock)], env=environment, capture_output=True,
                          text=True, timeout=timeout, check=False)
