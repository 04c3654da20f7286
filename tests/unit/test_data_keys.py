"""`bastion keys data`: the data keys of personal fields rotated and retired in the issuer's ring and handed to
exactly the services infra/personal-data.yaml entitles (readers before producers); retiring one crypto-shreds what
it sealed; an operator's mistakes named with exit status 2."""

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from bastion.cli import main
from bastion.devstack.data_keys import DataKeys
from bastion.devstack.errors import DevstackError
from bastion.devstack.layout import StateLayout
from bastion.devstack.stack import Stack
from bastion.devstack.writer_lock import writer_lock
from bastion.events.field_crypto import DataKeyRing, encrypt_field, field_context, reveal
from bastion.settings import DevstackSettings

TOPIC = "accounts.events.v1"
CONTEXT = field_context("bastion.accounts.v1.AccountOpened.owner_email", "acc-1")


@pytest.fixture()
def keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DataKeys:
    monkeypatch.setenv("BASTION_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("COLUMNS", "220")
    keys = Stack(DevstackSettings(), lambda _message: None).data_keys()
    keys.ensure()
    return keys


def ring(keys: DataKeys, holder: str) -> DataKeyRing:
    return DataKeyRing(keys.folder / holder)


def test_each_service_holds_exactly_the_keys_it_is_entitled_to(keys: DataKeys) -> None:
    [key_id] = keys.issuer.states(TOPIC)
    assert ring(keys, "accounts").get(TOPIC, key_id) is not None, "the producer seals with it"
    assert ring(keys, "notifications").get(TOPIC, key_id) is not None, "the entitled reader opens with it"
    assert not (keys.folder / "payments").exists() and not (keys.folder / "audit").exists()


def test_readers_are_given_a_key_before_its_producers() -> None:
    settings = DevstackSettings()
    keys = Stack(settings, lambda _message: None).data_keys()
    assert keys.handover_order(TOPIC) == ["notifications", "accounts"]


def test_after_a_rotation_new_fields_are_sealed_under_the_new_key_and_old_ones_still_open(
        keys: DataKeys, capsys: pytest.CaptureFixture[str]) -> None:
    [old] = keys.issuer.states(TOPIC)
    before = encrypt_field(ring(keys, "accounts"), TOPIC, CONTEXT, "alice@example.org")
    assert main(["keys", "data", "rotate", TOPIC]) == 0
    [new] = [key_id for key_id, state in keys.issuer.states(TOPIC).items() if state == "active"]
    assert new != old and f"sealed under {new} from now on" in capsys.readouterr().out
    after = encrypt_field(ring(keys, "accounts"), TOPIC, CONTEXT, "alice@example.org")
    assert (before.key_id, after.key_id) == (old, new)
    for field in (before, after):
        assert reveal(ring(keys, "notifications"), TOPIC, CONTEXT, field) == "alice@example.org"


def test_retiring_a_key_deletes_it_everywhere_and_what_it_sealed_is_unreadable(
        keys: DataKeys, capsys: pytest.CaptureFixture[str]) -> None:
    [old] = keys.issuer.states(TOPIC)
    sealed = encrypt_field(ring(keys, "accounts"), TOPIC, CONTEXT, "alice@example.org")
    assert main(["keys", "data", "rotate", TOPIC]) == 0
    assert main(["keys", "data", "retire", TOPIC, old, "--force"]) == 0
    assert "can no longer be read by anyone (crypto-shredding)" in " ".join(capsys.readouterr().out.split())
    for holder in ("issuer", "accounts", "notifications"):
        assert ring(keys, holder).get(TOPIC, old) is None, holder
        assert not any(path.name.startswith(old.split("/")[1]) for path in (keys.folder / holder / TOPIC).iterdir())
    assert reveal(ring(keys, "notifications"), TOPIC, CONTEXT, sealed) is None
    assert main(["keys", "data", "list"]) == 0
    listed = {line.split("│")[-2].strip(): line for line in capsys.readouterr().out.splitlines() if TOPIC in line}
    assert "retired" in listed[old] and "notifications" not in listed[old]
    [active] = [line for key_id, line in listed.items() if key_id != old]
    assert "active" in active and "accounts, notifications" in active


def test_the_active_key_an_unknown_key_and_a_topic_without_personal_fields_are_refused(
        keys: DataKeys, capsys: pytest.CaptureFixture[str]) -> None:
    [active] = keys.issuer.states(TOPIC)
    assert main(["keys", "data", "retire", TOPIC, active, "--force"]) == 2
    assert "rotate before retiring it" in capsys.readouterr().err
    assert main(["keys", "data", "retire", TOPIC, f"{TOPIC}/19700101-00000000", "--force"]) == 2
    assert f"{TOPIC} has no data key {TOPIC}/19700101-00000000" in capsys.readouterr().err
    assert main(["keys", "data", "rotate", "payments.events.v1"]) == 2
    assert "'payments.events.v1' has no personal fields, so no data keys" in " ".join(capsys.readouterr().err.split())
    assert keys.issuer.states(TOPIC) == {active: "active"}, "nothing changed"


def test_retiring_without_the_running_stack_is_refused_unless_forced(
        keys: DataKeys, capsys: pytest.CaptureFixture[str]) -> None:
    """Whether an event sealed under the key still waits in an outbox or in Kafka, nobody can tell then."""
    [old] = keys.issuer.states(TOPIC)
    keys.rotate(TOPIC)
    assert main(["keys", "data", "retire", TOPIC, old]) == 2
    refusal = " ".join(capsys.readouterr().err.split())
    assert f"cannot tell whether accounts has published every event of {TOPIC}: PostgreSQL is not running" in refusal
    assert ring(keys, "notifications").get(TOPIC, old) is not None, "not retired"


def test_a_copy_a_service_is_no_longer_entitled_to_is_taken_away(keys: DataKeys) -> None:
    """As when infra/personal-data.yaml stops naming a reader: the next hand-out deletes its copy."""
    keys.issuer.export_to(keys.folder / "payments", TOPIC)
    [key_id] = keys.issuer.states(TOPIC)
    assert ring(keys, "payments").get(TOPIC, key_id) is not None
    keys.distribute()
    assert not (keys.folder / "payments" / TOPIC).exists()
    assert ring(keys, "notifications").get(TOPIC, key_id) is not None


def test_a_service_no_longer_in_the_platform_keeps_no_key(keys: DataKeys) -> None:
    keys.issuer.export_to(keys.folder / "ledger", TOPIC)  # a service since removed from infra/services.yaml
    keys.distribute()
    assert not (keys.folder / "ledger" / TOPIC).exists()


def test_rotating_before_setup_is_refused_and_creates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("BASTION_STATE_DIR", str(tmp_path / "state"))
    assert main(["keys", "data", "rotate", TOPIC]) == 2
    assert f"no data keys of {TOPIC} yet" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()


def test_a_service_the_policy_names_but_the_platform_no_longer_runs_keeps_no_key(tmp_path: Path) -> None:
    """infra/personal-data.yaml may still entitle a reader that infra/services.yaml dropped: no copy for it."""
    settings = DevstackSettings(state_dir=tmp_path / "state")
    full = Stack(settings, lambda _message: None).data_keys()
    full.ensure()
    assert (full.folder / "notifications" / TOPIC).is_dir()
    running = [service for service in full.services if service != "notifications"]
    without = DataKeys(StateLayout(tmp_path / "state"), full.personal, running)
    without.distribute()
    assert not (without.folder / "notifications" / TOPIC).exists()
    assert (without.folder / "accounts" / TOPIC).is_dir(), "the producer still running keeps its copy"


def test_files_beside_the_key_folders_do_not_stop_the_hand_out(keys: DataKeys) -> None:
    (keys.folder / "README").write_text("stray file in the data keys folder")
    (keys.folder / "notifications" / "notes.txt").write_text("stray file in a service's copy")
    keys.distribute()
    assert (keys.folder / "notifications" / "notes.txt").exists()
    [key_id] = keys.issuer.states(TOPIC)
    assert ring(keys, "notifications").get(TOPIC, key_id) is not None


def test_a_topic_without_personal_fields_has_no_key_state_whatever_its_folder_holds(keys: DataKeys) -> None:
    """A topic whose personal fields were dropped from infra/personal-data.yaml: its old keys are not offered."""
    keys.issuer.rotate("payments.events.v1")
    assert keys.state("payments.events.v1", next(iter(keys.issuer.states("payments.events.v1")))) is None
    with pytest.raises(DevstackError, match=r"'payments\.events\.v1' has no personal fields"):
        keys.retire("payments.events.v1", next(iter(keys.issuer.states("payments.events.v1"))))


def test_keys_are_listed_oldest_first_whatever_their_ids(keys: DataKeys) -> None:
    keys.rotate(TOPIC)
    index = keys.folder / "issuer" / TOPIC / "keys.json"
    recorded = json.loads(index.read_text())
    first, second = sorted(recorded["keys"])  # made the same day: their ids' order is chance
    recorded["keys"][first]["created_at"] = "2026-11-28T12:00:02+00:00"
    recorded["keys"][second]["created_at"] = "2026-11-28T12:00:01+00:00"
    index.write_text(json.dumps(recorded))
    assert [key.key_id for key in keys.listing() if key.topic == TOPIC] == [second, first]


def test_a_rotation_that_waited_for_the_lock_looks_again_before_it_makes_a_key(keys: DataKeys) -> None:
    """The keys can go while a rotation waits for another writer (a `bastion reset` beside it): it makes none then."""
    failures: list[BaseException] = []

    def rotate() -> None:
        try:
            keys.rotate(TOPIC)
        except DevstackError as error:
            failures.append(error)

    with writer_lock(keys.folder):
        rotation = threading.Thread(target=rotate)
        rotation.start()
        time.sleep(0.3)  # it has looked once and now waits for the lock
        shutil.rmtree(keys.folder / "issuer" / TOPIC)
    rotation.join(10)
    assert [str(error).splitlines()[0] for error in failures] == [f"no data keys of {TOPIC} yet"]
    assert not (keys.folder / "issuer" / TOPIC).exists()
