"""The hash lock of Bastion's Python packages (requirements.lock) and the install that enforces it
(scripts/install_locked_deps.sh, run by `make setup`; docs/dependencies.md)."""

import os
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bastion.settings import PROJECT_ROOT

LOCK_FILE = PROJECT_ROOT / "requirements.lock"
INSTALL_SCRIPT = PROJECT_ROOT / "scripts" / "install_locked_deps.sh"


# pip's rules: a comment starts at a # at the line's start or after white space; a comment line is never continued.
_COMMENT = re.compile(r"(^|\s+)#.*$")
_WHOLE_LINE_COMMENT = re.compile(r"\s*#")


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
    """The lock's entries: one logical line per package, read as pip reads a requirements file."""
    entries = []
    for line in _logical_lines(text):
        if not line:
            continue
        words = line.split(" --hash=")
        try:
            requirement = Requirement(words[0])
        except ValueError as error:
            raise LockError(f"not a requirement: {line[:120]!r} ({error})") from None
        specs = list(requirement.specifier)
        if len(specs) != 1 or specs[0].operator != "==" or specs[0].version.endswith(".*"):
            raise LockError(f"not pinned to one version: {words[0]!r}")
        entries.append(LockEntry(canonicalize_name(requirement.name), specs[0].version, requirement.marker,
                                 tuple(words[1:]), line))
    return entries


def _logical_lines(text: str) -> Iterator[str]:
    """TEXT's logical lines as pip joins them (a line ending in a backslash goes on, unless it is a comment), comments
    dropped, white space collapsed."""
    pending: list[str] = []
    for raw in text.splitlines():
        if raw.endswith("\\") and not _WHOLE_LINE_COMMENT.match(raw):
            pending.append(raw[:-1])
            continue
        pending.append(raw)
        yield " ".join(_COMMENT.sub("", " ".join(pending)).split())
        pending = []
    if pending:
        yield " ".join(_COMMENT.sub("", " ".join(pending)).split())


def install_offline(venv: Path, lock: Path, index: Path, script: Path = INSTALL_SCRIPT,
                    timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the install script's lock step into VENV with LOCK, pip finding packages only in the folder INDEX (a
    stand-in for the package index: no network). On a timeout the script and its pip are killed together."""
    environment = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(index), "PIP_NO_CACHE_DIR": "1",
                   "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    command = ["bash", str(script), str(venv), str(lock), "-"]
    with subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(command, process.returncode, out, err)
