"""`bastion keys`: rotate, list and retire on an install's key ring, and the mistakes an operator can make named
with exit status 2 (a key that is not there, the active key, a producer that is not a service, a retirement
nobody can tell is safe, an audit key whose checkpoints no newer key vouches for yet). Retiring after the
consumers caught up is tested on a running stack (tests/integration/test_key_retirement.py)."""

from pathlib import Path

import pytest

from bastion.audit.chain import Head
from bastion.audit.checkpoints import sign_checkpoint
from bastion.audit.install_tools import ORIGIN
from bastion.cli import main
from bastion.devstack.layout import StateLayout
from bastion.events.keys import KeyRing


@pytest.fixture()
def ring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KeyRing:
    monkeypatch.setenv("BASTION_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("COLUMNS", "200")
    ring = KeyRing(StateLayout(tmp_path / "state").event_keys_dir)
    ring.ensure(["accounts", "payments"])
    return ring


def test_rotate_then_retire_the_previous_key(ring: KeyRing, capsys: pytest.CaptureFixture[str]) -> None:
    old = ring.signing_key("accounts").key_id
    assert main(["keys", "rotate", "accounts"]) == 0
    new = ring.signing_key("accounts").key_id
    assert new != old and f"accounts signs with {new} within 2 s" in capsys.readouterr().out
    assert main(["keys", "retire", "accounts", old, "--force"]) == 0
    assert f"{old} retired: running consumers refuse events signed with it within 2 s" in capsys.readouterr().out
    assert main(["keys", "list"]) == 0
    listed = capsys.readouterr().out
    assert "retired" in listed and "active" in listed and old in listed and new in listed


def test_the_active_key_an_unknown_key_and_a_stranger_are_refused(
    ring: KeyRing, capsys: pytest.CaptureFixture[str]
) -> None:
    active = ring.signing_key("accounts").key_id
    assert main(["keys", "retire", "accounts", active]) == 2
    assert "rotate before retiring it" in capsys.readouterr().err
    assert main(["keys", "retire", "accounts", "accounts/19700101-00000000"]) == 2
    assert "accounts has no key accounts/19700101-00000000" in capsys.readouterr().err
    assert main(["keys", "rotate", "mallory"]) == 2
    assert "'mallory' is not a service" in capsys.readouterr().err
    assert ring.signing_key("accounts").key_id == active, "nothing changed"


def test_retiring_without_a_running_kafka_is_refused_unless_forced(
    ring: KeyRing, capsys: pytest.CaptureFixture[str]
) -> None:
    old = ring.signing_key("accounts").key_id
    ring.rotate("accounts")
    assert main(["keys", "retire", "accounts", old]) == 2
    refusal = " ".join(capsys.readouterr().err.split())
    assert "cannot tell whether every consumer has read what accounts signed: Kafka is not running" in refusal
    assert "or add --force" in refusal
    assert ring.state("accounts", old) == "verify-only", "nothing retired"
    assert main(["keys", "retire", "accounts", old, "--force"]) == 0
    assert ring.state("accounts", old) == "retired"


def test_an_audit_key_is_retired_only_once_a_newer_key_vouches_for_its_checkpoints(
    ring: KeyRing, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("bastion.devstack.retirement.UNREAD_WAIT_SECONDS", 0.0)
    layout = StateLayout(tmp_path / "state")
    ring.ensure(["audit"])
    old = ring.signing_key("audit")
    layout.audit_checkpoints_file.parent.mkdir(parents=True, exist_ok=True)
    with layout.audit_checkpoints_file.open("a") as file:
        file.write(sign_checkpoint(old, ORIGIN, Head(4, b"\x04" * 32)).to_json() + "\n")
    ring.rotate("audit")
    assert main(["keys", "retire", "audit", old.key_id, "--force"]) == 2, "--force does not skip this check"
    refusal = " ".join(capsys.readouterr().err.split())
    assert "the audit service has not signed a checkpoint with its new key yet" in refusal
    assert "no later checkpoint of a trusted audit key covers it" in refusal
    assert ring.state("audit", old.key_id) == "verify-only", "nothing retired"
    with layout.audit_checkpoints_file.open("a") as file:  # what the audit service does within seconds
        file.write(sign_checkpoint(ring.signing_key("audit"), ORIGIN, Head(4, b"\x04" * 32)).to_json() + "\n")
    assert main(["keys", "retire", "audit", old.key_id, "--force"]) == 0
    assert "the checkpoints it signed are superseded by the newer key's" in " ".join(capsys.readouterr().out.split())
    assert ring.state("audit", old.key_id) == "retired"
