"""`bastion keys`: rotate, list and retire on an install's key ring, and the mistakes an operator can make named
with exit status 2 (a key that is not there, the active key, a producer that is not a service, a retirement
nobody can tell is safe, an audit key whose checkpoints no newer key vouches for yet). Retiring after the
consumers caught up is tested on a running stack (tests/integration/test_key_retirement.py)."""

import time
from pathlib import Path

import pytest

from bastion.audit.chain import Head
from bastion.audit.checkpoints import sign_checkpoint
from bastion.audit.install_tools import ORIGIN
from bastion.cli import main
from bastion.devstack.layout import StateLayout
from bastion.events.keys import KeyRing, SigningKey


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


def test_an_audit_key_is_retired_only_once_a_newer_key_vouches_for_its_checkpoints_or_when_forced(
    ring: KeyRing, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("bastion.devstack.retirement.UNREAD_WAIT_SECONDS", 0.0)
    monkeypatch.setattr("bastion.cli.unread_by_consumers", lambda *_args: [])  # no Kafka in a unit test
    layout = StateLayout(tmp_path / "state")
    ring.ensure(["audit"])
    old = ring.signing_key("audit")
    layout.audit_checkpoints_file.parent.mkdir(parents=True, exist_ok=True)

    def signed(key: SigningKey) -> None:
        with layout.audit_checkpoints_file.open("a") as file:
            file.write(sign_checkpoint(key, ORIGIN, Head(4, b"\x04" * 32)).to_json() + "\n")

    signed(old)
    ring.rotate("audit")
    assert main(["keys", "retire", "audit", old.key_id]) == 2
    refusal = " ".join(capsys.readouterr().err.split())
    assert f"{old.key_id}'s checkpoints would be all that vouches for the audit log" in refusal
    assert "no later checkpoint of a trusted audit key covers it" in refusal and "Or add --force" in refusal
    assert ring.state("audit", old.key_id) == "verify-only", "nothing retired"
    signed(ring.signing_key("audit"))  # what the audit service does within seconds
    assert main(["keys", "retire", "audit", old.key_id]) == 0
    assert "the checkpoints it signed are superseded by the newer key's" in " ".join(capsys.readouterr().out.split())
    assert ring.state("audit", old.key_id) == "retired"

    second = ring.signing_key("audit")
    ring.rotate("audit")  # and this time the key leaked with the audit service down: retire it at once
    monkeypatch.setattr("bastion.devstack.retirement.UNREAD_WAIT_SECONDS", 3600.0)

    def no_waiting(_seconds: float) -> None:
        raise AssertionError("--force waited for the audit service's new checkpoint")

    monkeypatch.setattr("bastion.devstack.retirement.time.sleep", no_waiting)
    assert main(["keys", "retire", "audit", second.key_id, "--force"]) == 0
    warning = " ".join(capsys.readouterr().err.split())
    assert "`bastion audit verify` fails until the audit service has signed with its new key" in warning
    assert "no later checkpoint of a trusted audit key covers it" in warning
    assert ring.state("audit", second.key_id) == "retired"


def test_an_audit_checkpoint_file_that_does_not_verify_is_said_at_once(
    ring: KeyRing, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = StateLayout(tmp_path / "state")
    ring.ensure(["audit"])
    old = ring.signing_key("audit")
    layout.audit_checkpoints_file.parent.mkdir(parents=True, exist_ok=True)
    layout.audit_checkpoints_file.write_text("not a checkpoint\n")
    ring.rotate("audit")
    started = time.monotonic()
    assert main(["keys", "retire", "audit", old.key_id]) == 2
    assert time.monotonic() - started < 5, "no waiting for what waiting cannot mend"
    assert "the checkpoint file does not verify now" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize(("argv", "said"), [
    (["keys", "retire", "accounts", "[/x]"], "accounts has no key [/x]"),  # the command's own refusal
    (["keys", "data", "rotate", "[/x]"], "'[/x]' has no personal fields"),  # a DevstackError, through main
    (["keys", "data", "rotate", "[bold]x"], "'[bold]x' has no personal fields"),
])
def test_what_the_operator_typed_is_printed_as_typed_never_read_as_markup(
    ring: KeyRing, capsys: pytest.CaptureFixture[str], argv: list[str], said: str
) -> None:
    """A bracket in an argument was read as rich markup: "[/x]" raised MarkupError, in main's own handler too (a
    stack trace, exit 1), and "[bold]" vanished from the message."""
    assert main(argv) == 2
    assert said in " ".join(capsys.readouterr().err.split())
