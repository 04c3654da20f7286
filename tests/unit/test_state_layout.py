"""The state folder's modes: the root and the data folder traversable only (a dropped-privilege PostgreSQL reaches
its data through them); every other folder the install makes is owner-only, the folders the key rings make as
they write keys included."""

import errno
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from bastion.devstack.layout import StateLayout, write_private
from bastion.events.field_crypto import DataKeyRing
from bastion.events.keys import KeyRing


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_no_folder_of_a_new_install_but_the_traversable_two_can_be_reached_by_others(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path / "state")
    layout.ensure()
    KeyRing(layout.event_keys_dir).ensure(["accounts"])
    DataKeyRing(layout.data_keys_dir / "issuer").rotate("accounts.events.v1")
    assert mode(layout.root) == mode(layout.data_dir) == 0o711
    folders = [path for path in layout.root.rglob("*") if path.is_dir() and path != layout.data_dir]
    assert {layout.keys_dir, layout.event_keys_dir, layout.data_keys_dir} <= set(folders)
    # The folders the key rings make as they write keys are owner-only themselves, not only closed by keys/.
    assert {path: oct(mode(path)) for path in folders if mode(path) != 0o700} == {}
    # Another user can reach a folder only through folders it may traverse: one owner-only folder on the way
    # closes everything below it.
    reachable = [path for path in folders
                 if all(mode(folder) & 0o011 for folder in [path, *path.parents] if layout.root in folder.parents)]
    assert reachable == []
    assert mode(layout.keys_dir) == 0o700


def test_a_keys_folder_an_older_install_left_open_is_closed_again(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path / "state")
    layout.ensure()
    for folder in (layout.keys_dir, layout.event_keys_dir, layout.data_keys_dir):
        folder.chmod(0o755)
    layout.ensure()
    assert mode(layout.keys_dir) == mode(layout.event_keys_dir) == mode(layout.data_keys_dir) == 0o700


def test_a_new_install_has_each_of_its_folders_and_every_key_lives_below_keys(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path / "state")
    layout.ensure()
    for folder in (layout.pki_dir, layout.keys_dir, layout.event_keys_dir, layout.data_keys_dir, layout.run_dir,
                   layout.log_dir, layout.conf_dir, layout.dist_dir, layout.audit_checkpoints_file.parent):
        assert folder.is_dir() and mode(folder) == 0o700, folder
    for key_folder in (layout.event_keys_dir, layout.data_keys_dir, layout.backup_keys_dir,
                       layout.at_rest_key("accounts").parent):
        assert layout.keys_dir in key_folder.parents, key_folder


def test_a_private_file_written_again_is_its_new_content_only_and_owner_only_again(tmp_path: Path) -> None:
    path = tmp_path / "secret.json"
    write_private(path, "a much longer first content")
    path.chmod(0o644)
    write_private(path, b"short")
    assert path.read_bytes() == b"short"
    assert mode(path) == 0o600


def test_folders_made_for_a_private_file_are_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o077 | 0o200)  # would leave a new folder 0500: not even its owner could write in it
    try:
        write_private(tmp_path / "a" / "b" / "key.pem", "key")
    finally:
        os.umask(previous)
    assert mode(tmp_path / "a") == mode(tmp_path / "a" / "b") == 0o700
    assert mode(tmp_path / "a" / "b" / "key.pem") == 0o600


def _disk_full(fd: int, data: bytes) -> int:
    raise OSError(errno.ENOSPC, "No space left on device")


def _short_writes(fd: int, data: bytes) -> int:
    return WRITE(fd, bytes(data)[:3])  # what write(2) may do near a full disk: fewer bytes, and no error


WRITE = os.write


@pytest.mark.parametrize("write", [_disk_full, _short_writes], ids=["write-fails", "short-writes"])
def test_a_private_file_is_replaced_whole_or_kept_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            write: Any) -> None:
    """The credentials file (or a key) written again over a full disk: never left empty or cut short."""
    path = tmp_path / "credentials.json"
    write_private(path, '{"postgres": {"admin": "the install\'s only copy"}}')
    monkeypatch.setattr(os, "write", write)
    try:
        write_private(path, '{"postgres": {"admin": "the install\'s only copy", "audit": "new"}}')
    except OSError:
        pass
    finally:
        monkeypatch.undo()
    assert path.read_text() in ('{"postgres": {"admin": "the install\'s only copy"}}',
                                '{"postgres": {"admin": "the install\'s only copy", "audit": "new"}}')
    assert [child.name for child in tmp_path.iterdir()] == ["credentials.json"]  # nothing left aside
    assert mode(path) == 0o600
