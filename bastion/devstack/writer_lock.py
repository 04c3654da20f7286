"""One writer at a time for a folder of the state directory whose index files are read, changed and written back.

The key rings keep their state in an index file (the trust store, a topic's keys.json) that `rotate` and `retire`
load, change and replace whole. Readers need no lock (a replaced file is seen old or new, never torn), but two
writers at once would each write back what they read, and the second would undo the first: a rotation lost from
the trust store while its key already signs, a retired data key handed out again. `writer_lock(folder)` holds an
exclusive `flock` on FOLDER/.writer.lock until its block ends, across processes (two `bastion keys` commands,
a setup beside them) and threads. A thread already holding the lock of a folder may take it again (a rotation
inside `ensure`). Where several are held, they are taken outside in: the data-keys folder (an operator's change),
then the issuer's ring, then the copy being written (`DataKeyRing.export_to`); nothing takes them the other way.
"""

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bastion.devstack.layout import PRIVATE_FILE_MODE, private_folders

LOCK_FILE = ".writer.lock"

_held = threading.local()  # the folders this thread holds the lock of, with how deep


def _forget_in_child() -> None:
    """A forked child holds none of its parent's locks: it takes its own turn (its copy of the parent's descriptor
    shares the parent's lock, which is the parent's to let go)."""
    _held.__dict__.pop("depths", None)


os.register_at_fork(after_in_child=_forget_in_child)


@contextmanager
def writer_lock(folder: Path) -> Iterator[None]:
    """Hold FOLDER's writer lock until the block ends (waiting for any other holder); FOLDER is made owner-only if
    it does not exist yet."""
    key = os.path.realpath(folder)  # one key per folder however spelt: flock taken twice would wait on itself
    depths: dict[str, int] = _held.__dict__.setdefault("depths", {})
    if depths.get(key):
        depths[key] += 1
        try:
            yield
        finally:
            depths[key] -= 1
        return
    private_folders(folder)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        depths[key] = 1
        try:
            yield
        finally:
            del depths[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
