"""Where each file of a dev install lives inside the state folder (git-ignored, private to the user)."""

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

PRIVATE_FILE_MODE = 0o600


@dataclass(frozen=True)
class StateLayout:
    """The paths of one dev install, derived from its state folder."""

    root: Path

    @property
    def credentials_file(self) -> Path:
        return self.root / "credentials.json"

    @property
    def pki_dir(self) -> Path:
        return self.root / "pki"

    @property
    def keys_dir(self) -> Path:
        """Every key of the install: signing, data, at-rest and backup keys, each kind in a folder of its own."""
        return self.root / "keys"

    @property
    def event_keys_dir(self) -> Path:
        """Producers' Ed25519 signing keys and the trust store (see bastion.events.keys)."""
        return self.keys_dir / "events"

    @property
    def data_keys_dir(self) -> Path:
        """Per-topic AES data keys: `issuer/` holds them all, `SERVICE/` the copies SERVICE is entitled to."""
        return self.keys_dir / "data"

    def at_rest_key(self, service: str) -> Path:
        """SERVICE's AES key for personal data it stores in its database, kept outside that database."""
        return self.keys_dir / "at-rest" / f"{service}.key"

    @property
    def backup_keys_dir(self) -> Path:
        """The age identity and recipient, and the Ed25519 key, of encrypted backups (bastion.devstack.backups)."""
        return self.keys_dir / "backup"

    @property
    def backups_dir(self) -> Path:
        return self.root / "backups"

    @property
    def audit_checkpoints_file(self) -> Path:
        """The audit service's signed checkpoints, one JSON line each: kept outside the database on purpose."""
        return self.root / "audit" / "checkpoints.jsonl"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    @property
    def conf_dir(self) -> Path:
        return self.root / "conf"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def dist_dir(self) -> Path:
        return self.root / "dist"

    def pid_file(self, component: str) -> Path:
        return self.run_dir / f"{component}.pid"

    def log_file(self, component: str) -> Path:
        return self.log_dir / f"{component}.log"

    def component_conf(self, component: str) -> Path:
        return self.conf_dir / component

    def component_data(self, component: str) -> Path:
        return self.data_dir / component

    def ensure(self) -> None:
        """Create the folders; the root is traversable (0711) so a dropped-privilege PostgreSQL can reach
        its data folder, but nothing in it can be listed or read by others."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)  # noqa: S103 - traverse only, see docstring
        for folder in (self.pki_dir, self.keys_dir, self.event_keys_dir, self.data_keys_dir, self.run_dir,
                       self.log_dir, self.conf_dir, self.dist_dir, self.audit_checkpoints_file.parent):
            folder.mkdir(exist_ok=True)
            os.chmod(folder, 0o700)
        self.data_dir.mkdir(exist_ok=True)
        os.chmod(self.data_dir, 0o711)  # noqa: S103 - traverse only


def write_private(path: Path, content: str | bytes) -> None:
    """Write a file that only its owner may read (0600), created with that mode so it is never exposed, and replaced
    whole: PATH holds its old content or the new, never part of it; folders it needs that do not exist yet are made
    owner-only (0700) too."""
    data = content.encode() if isinstance(content, str) else content
    private_folders(path.parent)
    # Written aside in full, then renamed over PATH: truncating PATH in place and writing it again would leave it
    # empty or cut short on a crash or a full disk (the install's credentials or a key lost for good), and a
    # reader (a service reading its data key) could see it half written.
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        try:
            view = memoryview(data)
            while view:  # os.write may write less than it was given (a full disk): go on or fail, never cut short
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    os.chmod(path, PRIVATE_FILE_MODE)  # mkstemp made it 0600 at most; exactly 0600 whatever the umask


def private_folders(folder: Path) -> None:
    """Make FOLDER and each missing folder above it, owner-only (0700); folders that exist are left as they are."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        made.mkdir(mode=0o700, exist_ok=True)
        os.chmod(made, 0o700)  # whatever the umask
