"""One writer at a time for the key rings' index files (bastion/devstack/writer_lock.py): rotations and retirements
run at once from several processes lose nothing, and the lock itself waits, nests and lets go as it should."""

import json
import multiprocessing
import multiprocessing.synchronize
import stat
import threading
import time
from pathlib import Path

import pytest

from bastion.devstack.stack import Stack
from bastion.devstack.writer_lock import LOCK_FILE, writer_lock
from bastion.events.field_crypto import DataKeyRing
from bastion.events.keys import KeyRing
from bastion.settings import DevstackSettings

WRITERS = 4
ROTATIONS = 6
TOPIC = "accounts.events.v1"


def _rotate_signing_keys(folder: str, producer: str, start: multiprocessing.synchronize.Event) -> None:
    start.wait()
    for _ in range(ROTATIONS):
        KeyRing(Path(folder)).rotate(producer)


def _rotate_data_keys(folder: str, start: multiprocessing.synchronize.Event) -> None:
    start.wait()
    for _ in range(ROTATIONS):
        DataKeyRing(Path(folder)).rotate(TOPIC)


def _run_at_once(target, argument_lists) -> None:  # type: ignore[no-untyped-def]
    context = multiprocessing.get_context("fork")
    start = context.Event()
    workers = [context.Process(target=target, args=(*arguments, start)) for arguments in argument_lists]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0


def test_signing_key_rotations_from_several_processes_at_once_all_reach_the_trust_store(tmp_path: Path) -> None:
    # Without the lock each writer writes back the trust store it read, and the last undoes the others: a key that
    # already signs goes missing from the store, and every event it signed is refused as an unknown key.
    ring = KeyRing(tmp_path / "keys")
    _run_at_once(_rotate_signing_keys, [(str(ring.folder), f"service-{n}") for n in range(WRITERS)])

    producers = json.loads(ring.trust_store_file.read_text())["producers"]
    assert sorted(producers) == [f"service-{n}" for n in range(WRITERS)]
    for producer, keys in producers.items():
        assert len(keys) == ROTATIONS, producer
        assert [entry["state"] for entry in keys.values()].count("active") == 1
        for key_id in keys:
            assert ring._private_file(producer, key_id).exists()


def test_data_key_rotations_of_one_topic_from_several_processes_keep_every_key_and_one_active(tmp_path: Path) -> None:
    # A rotation lost from the index leaves its key's fields sealed under a key id no ring knows: unreadable.
    ring = DataKeyRing(tmp_path / "issuer")
    ring.ensure([TOPIC])
    _run_at_once(_rotate_data_keys, [(str(ring.folder),) for _ in range(WRITERS)])

    states = ring.states(TOPIC)
    assert len(states) == 1 + WRITERS * ROTATIONS
    assert list(states.values()).count("active") == 1
    assert all(ring.get(TOPIC, key_id) is not None for key_id in states)


def test_a_second_writer_waits_until_the_first_lets_go(tmp_path: Path) -> None:
    order: list[str] = []
    first_holds = threading.Event()

    def first() -> None:
        with writer_lock(tmp_path):
            first_holds.set()
            time.sleep(0.2)
            order.append("first done")

    def second() -> None:
        first_holds.wait()
        with writer_lock(tmp_path):
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert order == ["first done", "second in"]


def test_the_holder_may_take_its_lock_again_and_still_holds_it_until_the_outer_block_ends(tmp_path: Path) -> None:
    taken = threading.Event()

    def other() -> None:
        with writer_lock(tmp_path):
            taken.set()

    with writer_lock(tmp_path):
        with writer_lock(tmp_path):
            pass
        waiter = threading.Thread(target=other)
        waiter.start()
        assert not taken.wait(0.2)  # the inner block's end did not let go
    waiter.join(10)
    assert taken.is_set()


def test_the_lock_is_let_go_when_its_block_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), writer_lock(tmp_path):
        raise RuntimeError("a failed rotation")
    done = threading.Event()
    threading.Thread(target=lambda: (writer_lock(tmp_path).__enter__(), done.set())).start()
    assert done.wait(5)


def test_a_missing_folder_is_made_owner_only_and_the_lock_file_is_private(tmp_path: Path) -> None:
    folder = tmp_path / "state" / "keys"
    with writer_lock(folder):
        pass
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / LOCK_FILE).stat().st_mode) == 0o600


def test_an_operators_rotation_holds_the_data_keys_folder_until_every_copy_has_its_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Another rotation or retirement slipping in between would hand a producer a key before its readers hold it.
    monkeypatch.setenv("BASTION_STATE_DIR", str(tmp_path / "state"))
    keys = Stack(DevstackSettings(), lambda _message: None).data_keys()
    keys.ensure()
    others_got_in: list[bool] = []
    others: list[threading.Thread] = []

    def another_operator_tries() -> None:
        got_in = threading.Event()

        def another_operator() -> None:
            with writer_lock(keys.folder):
                got_in.set()

        others.append(threading.Thread(target=another_operator))
        others[-1].start()
        others_got_in.append(got_in.wait(0.1))

    def watched(step):  # type: ignore[no-untyped-def]
        def run(*args):  # type: ignore[no-untyped-def]
            another_operator_tries()
            return step(*args)
        return run

    monkeypatch.setattr(DataKeyRing, "rotate", watched(DataKeyRing.rotate))
    monkeypatch.setattr(DataKeyRing, "export_to", watched(DataKeyRing.export_to))
    keys.rotate(TOPIC)
    for other in others:
        other.join(10)
    assert len(others_got_in) == 1 + len(keys.handover_order(TOPIC))  # the issuer's rotation, then each copy
    assert not any(others_got_in)


def _take_and_mark(folder: str, marker: str) -> None:
    with writer_lock(Path(folder)):
        Path(marker).write_text("in")


def test_a_child_forked_while_the_lock_is_held_waits_its_turn(tmp_path: Path) -> None:
    marker = tmp_path / "child-got-in"
    with writer_lock(tmp_path):
        child = multiprocessing.get_context("fork").Process(target=_take_and_mark, args=(str(tmp_path), str(marker)))
        child.start()
        child.join(0.3)
        assert not marker.exists(), "the parent's hold is not the child's"
    child.join(10)
    assert child.exitcode == 0 and marker.read_text() == "in"


def test_one_folder_under_two_spellings_is_one_lock_for_its_holder(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    done = threading.Event()

    def nested() -> None:
        with writer_lock(tmp_path / "real"), writer_lock(tmp_path / "alias"):
            done.set()

    threading.Thread(target=nested, daemon=True).start()
    assert done.wait(5), "taken again under another name, it waited on itself"
