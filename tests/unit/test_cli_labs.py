"""`bastion lab` and the other commands' exit statuses without a stack: a usage mistake is 2, a stack that is not
running is 2, the labs' worst verdict is the exit status, and a command that finds a problem never exits 0."""

import datetime as dt
import io
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any, ClassVar

import grpc
import pytest
from rich.console import Console

from bastion import cli
from bastion.audit.v1 import audit_pb2
from bastion.cli import main
from bastion.devstack.errors import DevstackError
from bastion.labs import LABS
from bastion.labs.base import Lab, LabResult
from bastion.labs.platform import LabSetupError
from tests.unit.labs.fakes import RpcError, result


class FakeSession:
    """What `Session.of_running_stack` gives: here only whether it was closed."""

    opened: ClassVar[list["FakeSession"]] = []

    def __init__(self) -> None:
        self.closed = False
        FakeSession.opened.append(self)

    @classmethod
    def of_running_stack(cls, settings: Any) -> "FakeSession":
        return cls()

    def close(self) -> None:
        self.closed = True


@pytest.fixture()
def session(monkeypatch: pytest.MonkeyPatch) -> type[FakeSession]:
    FakeSession.opened = []
    monkeypatch.setattr(cli, "Session", FakeSession)
    monkeypatch.setenv("COLUMNS", "300")
    return FakeSession


def verdicts(monkeypatch: pytest.MonkeyPatch, **held: tuple[bool | None, ...]) -> list[tuple[str, ...]]:
    """Make every lab run end with HELD (per lab name, `True` when absent); return the names each run asked for."""
    asked: list[tuple[str, ...]] = []

    def run_labs(labs: Sequence[Lab], session: Any, console: Any) -> Mapping[str, LabResult]:
        asked.append(tuple(lab.name for lab in labs))
        return {lab.name: result(lab.name, *held.get(lab.name.replace("-", "_"), (True,))) for lab in labs}

    monkeypatch.setattr(cli, "run_labs", run_labs)
    return asked


@pytest.mark.parametrize("argv", [["lab", "run"], ["lab", "run", "forged-token", "--all"]],
                         ids=["neither", "both"])
def test_naming_no_lab_or_a_lab_and_all_is_a_usage_error_before_any_session(
    argv: list[str], session: type[FakeSession], capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(argv) == 2
    assert "name one lab, or --all" in capsys.readouterr().err
    assert session.opened == []


def test_an_unknown_lab_is_a_usage_error_naming_it(session: type[FakeSession],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "run", "forged-tokens"]) == 2
    assert "no lab 'forged-tokens'" in capsys.readouterr().err
    assert session.opened == []


def test_a_stack_that_is_not_running_is_exit_2_with_the_reason(monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(settings: Any) -> None:
        raise LabSetupError("the stack of /state is not running (kafka not healthy): start it with `bastion up`")

    monkeypatch.setattr(cli.Session, "of_running_stack", refuse)
    monkeypatch.setenv("COLUMNS", "300")
    assert main(["lab", "run", "forged-token"]) == 2
    assert "kafka not healthy" in capsys.readouterr().err


@pytest.mark.parametrize(("held", "status"), [
    ((True,), 0), ((True, False), 1), ((None,), 1), ((), 1),
])
def test_one_lab_exits_with_its_verdict_without_a_scorecard(
    held: tuple[bool | None, ...], status: int, session: type[FakeSession], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    asked = verdicts(monkeypatch, forged_token=held)
    assert main(["lab", "run", "forged-token"]) == status
    assert asked == [("forged-token",)]
    assert "Scorecard" not in capsys.readouterr().out
    assert [opened.closed for opened in session.opened] == [True]


def test_all_runs_the_whole_catalogue_then_the_scorecard_and_exits_with_the_worst(
    session: type[FakeSession], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    asked = verdicts(monkeypatch, rate_limit=(True, False))
    assert main(["lab", "run", "--all"]) == 1
    assert asked == [tuple(lab.name for lab in cli.LABS)]
    out = capsys.readouterr().out
    assert "Scorecard" in out and "rate-limit (not held)" in out


def test_all_held_exits_0(session: type[FakeSession], monkeypatch: pytest.MonkeyPatch) -> None:
    verdicts(monkeypatch)
    assert main(["lab", "run", "--all"]) == 0


def test_the_session_is_closed_even_when_running_the_labs_fails(
    session: type[FakeSession], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    def crash(*args: Any) -> None:
        raise RuntimeError("the console went away")

    monkeypatch.setattr(cli, "run_labs", crash)
    assert main(["lab", "run", "forged-token"]) == 3
    assert [opened.closed for opened in session.opened] == [True]
    assert "unexpected RuntimeError: the console went away" in capsys.readouterr().err


@pytest.mark.parametrize(("raised", "status", "said"), [
    (DevstackError("no event keys yet", "run `make setup` first"), 2, "bastion lab: no event keys yet"),
    (KeyboardInterrupt(), 130, "bastion lab: interrupted"),
    (ValueError("odd"), 3, "bastion lab: unexpected ValueError: odd"),
])
def test_main_turns_what_a_command_raised_into_one_line_and_a_nonzero_status(
    raised: BaseException, status: int, said: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def fail(args: Any) -> int:
        raise raised

    monkeypatch.setattr(cli, "cmd_lab_list", fail)
    monkeypatch.setenv("COLUMNS", "300")
    assert main(["lab", "list"]) == status
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err


def test_lab_list_names_every_lab_and_exits_0(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    assert main(["lab", "list"]) == 0
    out = capsys.readouterr().out
    assert all(lab.name in out for lab in cli.LABS)


# --- the other commands: a problem found is never exit 0 ---


class FakeStack:
    def __init__(self, status: dict[str, Any] | None = None) -> None:
        self._status = status or {}
        self.layout = SimpleNamespace(log_dir="/logs")

    def status(self) -> dict[str, Any]:
        return self._status

    def context(self) -> Any:
        return SimpleNamespace(service_names=["accounts"])


def on_stack(monkeypatch: pytest.MonkeyPatch, stack: FakeStack) -> None:
    monkeypatch.setattr(cli, "_stack", lambda quiet=False: stack)
    monkeypatch.setenv("COLUMNS", "300")


def component(healthy: bool, **more: Any) -> dict[str, Any]:
    return {"healthy": healthy, "pid": 1, **more}


@pytest.mark.parametrize(("components", "status"), [
    ({"kafka": component(True), "redis": component(True)}, 0),
    ({"kafka": component(True), "redis": component(False)}, 1),
    ({"kafka": component(False), "redis": component(False)}, 1),
    ({}, 1),
], ids=["healthy", "one-down", "all-down", "nothing"])
def test_status_exits_1_unless_every_infrastructure_component_is_healthy(
    components: dict[str, Any], status: int, monkeypatch: pytest.MonkeyPatch,
) -> None:
    on_stack(monkeypatch, FakeStack({"components": components}))
    assert main(["status"]) == status
    assert main(["status", "--json"]) == status


def audit_report(ok: bool) -> Any:
    report = SimpleNamespace(ok=ok, head_hash=b"\x01\x02", length=10, anchored_length=8, first_bad_seq=4 if not ok
                             else None, reason="" if ok else "record 4 does not chain")
    return SimpleNamespace(report=report, checkpoints=2, checkpoint_length=8, superseded=0, published=2)


def test_audit_verify_exits_1_and_names_the_first_bad_record_when_the_chain_breaks(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    on_stack(monkeypatch, FakeStack())
    monkeypatch.setattr(cli.install_tools, "verify", lambda ctx: audit_report(False))
    assert main(["audit", "verify"]) == 1
    said = capsys.readouterr()
    assert "audit chain NOT verified at seq 4: record 4 does not chain" in said.err
    assert "verified" not in said.out
    monkeypatch.setattr(cli.install_tools, "verify", lambda ctx: audit_report(True))
    assert main(["audit", "verify"]) == 0
    assert "audit chain verified" in capsys.readouterr().out


def test_audit_rebuild_exits_1_when_the_projections_differ(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    on_stack(monkeypatch, FakeStack())
    for matches, status, verdict in ((False, 1, "DIFFERENT from"), (True, 0, "identical to")):
        rebuilt = SimpleNamespace(matches=matches, replayed=3, rebuilt={"p": "a" * 20}, live={"p": "b" * 20})
        monkeypatch.setattr(cli.install_tools, "rebuild_projections", lambda ctx, rebuilt=rebuilt: rebuilt)
        assert main(["audit", "rebuild"]) == status
        assert verdict in capsys.readouterr().out


@pytest.mark.parametrize("command", ["refusals", "alerts"])
def test_audit_refusals_and_alerts_exit_1_when_the_audit_service_refuses(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    on_stack(monkeypatch, FakeStack())

    def refuse(ctx: Any, minutes: float, limit: int) -> None:
        raise RpcError(grpc.StatusCode.PERMISSION_DENIED, "not an auditor")

    monkeypatch.setattr(cli.refusals, f"recent_{command}", refuse)
    assert main(["audit", command]) == 1
    said = capsys.readouterr()
    assert "refused or did not answer: PERMISSION_DENIED: not an auditor" in said.err
    assert said.out == ""


def test_a_list_of_refusals_cut_at_its_limit_says_there_may_be_more(monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    on_stack(monkeypatch, FakeStack())
    event = audit_pb2.AuditEvent(seq=7, kind="access", decision="deny", principal="bob", action="/x/Y", reason="r")
    monkeypatch.setattr(cli.refusals, "recent_refusals", lambda ctx, minutes, limit: [event] * min(limit, 3))
    assert main(["audit", "refusals", "--minutes", "10", "--limit", "3"]) == 0
    heading = capsys.readouterr().out.splitlines()[0]
    assert heading == "the newest 3 refusals of the last 10 minutes (there may be more: raise --limit), oldest first:"
    assert main(["audit", "refusals", "--minutes", "10", "--limit", "5"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "3 refusals in the last 10 minutes, oldest first:"


def test_lab_list_prints_every_name_whole_on_a_narrow_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    screen = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=screen, width=60))
    assert main(["lab", "list"]) == 0
    printed = screen.getvalue()
    assert all(lab.name in printed for lab in LABS), "a name cut short cannot be run"


def test_a_trail_piped_elsewhere_prints_one_whole_line_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    on_stack(monkeypatch, FakeStack())
    trace = "trace_id=" + "c3" * 16
    step = SimpleNamespace(at=dt.datetime(2026, 11, 28, 15, 4, 5, 678000, tzinfo=dt.UTC), source="payments.spans",
                           text=f"SERVER /bastion.payments.v1.Payments/Transfer {trace} span_id={'ab' * 8}")
    monkeypatch.setattr(cli, "trail", lambda *args: [step])
    piped = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=piped, width=80))  # a file: not a terminal
    assert main(["trail", "demo-1"]) == 0
    assert piped.getvalue().splitlines() == [f"15:04:05.678  payments.spans  {step.text}"]
    step.text = "reason=bad\n15:00:00.000  accounts.log  forged"
    piped.truncate(0)
    piped.seek(0)
    assert main(["trail", "demo-1"]) == 0
    shown = "15:04:05.678  payments.spans  reason=bad\\n15:00:00.000  accounts.log  forged"
    assert piped.getvalue().splitlines() == [shown], "one line, the break shown as \\n"


def test_a_trail_on_a_terminal_shows_a_callers_text_as_it_is_never_as_markup(monkeypatch: pytest.MonkeyPatch) -> None:
    on_stack(monkeypatch, FakeStack())
    step = SimpleNamespace(at=dt.datetime(2026, 11, 28, 15, 4, 5, 678000, tzinfo=dt.UTC), source="audit seq 7",
                           text="access: mallory /x/[/b][on black]hidden: deny (no rule)")
    monkeypatch.setattr(cli, "trail", lambda *args: [step])
    screen = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=screen, width=200, force_terminal=True, color_system=None))
    assert main(["trail", "demo-1"]) == 0
    assert "/x/[/b][on black]hidden: deny" in screen.getvalue()


def test_audit_refusals_show_a_callers_method_path_escaped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The action of a refused call is the path its caller sent: escape sequences and line breaks never reach the
    operator's terminal as they are."""
    on_stack(monkeypatch, FakeStack())
    event = SimpleNamespace(seq=7, kind="access", decision="deny", principal="mallory",
                            action="/x\x1b]0;pwned\x07\x1b[2J\n/Y", topic="", reason="no rule", correlation_id="c-1",
                            occurred_at=SimpleNamespace(ToDatetime=lambda tz: dt.datetime(2026, 11, 28, tzinfo=dt.UTC)))
    monkeypatch.setattr(cli, "_ask_audit", lambda query, args: [event])
    screen = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=screen, width=300, force_terminal=True, color_system=None))
    assert main(["audit", "refusals"]) == 0
    shown = screen.getvalue()
    assert "\x1b" not in shown and "/x\\x1b]0;pwned\\x07\\x1b[2J\\n/Y" in shown


def test_trail_exits_1_when_nothing_carries_the_id(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    on_stack(monkeypatch, FakeStack())
    monkeypatch.setattr(cli, "trail", lambda *args: [])
    assert main(["trail", "lab-nothing"]) == 1
    assert "nothing carries correlation id 'lab-nothing'" in capsys.readouterr().err


def test_backup_verify_exits_1_when_one_backup_does_not_verify(monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    on_stack(monkeypatch, FakeStack())
    folders = [SimpleNamespace(name="good"), SimpleNamespace(name="bad")]
    monkeypatch.setattr(cli.backups, "listed", lambda ctx: folders)

    def verify(ctx: Any, folder: Any, decrypt: bool) -> Any:
        if folder.name == "bad":
            raise cli.backups.BackupError("a digest does not match", "restore another")
        return SimpleNamespace(databases={"notifications": {"bytes": 1}})

    monkeypatch.setattr(cli.backups, "verify", verify)
    assert main(["backup", "verify"]) == 1
    said = capsys.readouterr()
    assert "backup bad NOT verified: a digest does not match" in said.err and "backup good verified" in said.out
    monkeypatch.setattr(cli.backups, "listed", lambda ctx: folders[:1])
    assert main(["backup", "verify"]) == 0


def test_backup_list_exits_1_when_a_backup_it_lists_does_not_verify(monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    on_stack(monkeypatch, FakeStack())
    folders = [SimpleNamespace(name="good"), SimpleNamespace(name="bad")]

    def verify(ctx: Any, folder: Any, decrypt: bool) -> Any:
        if folder.name == "bad":
            raise cli.backups.BackupError("a file [red]added[/red] to it", "restore another")
        return SimpleNamespace(databases={"notifications": {"bytes": 1}})

    monkeypatch.setattr(cli.backups, "verify", verify)
    monkeypatch.setattr(cli.backups, "listed", lambda ctx: folders)
    assert main(["backup", "list"]) == 1
    assert "a file [red]added[/red] to it" in capsys.readouterr().out, "a file name is printed as it is"
    monkeypatch.setattr(cli.backups, "listed", lambda ctx: folders[:1])
    assert main(["backup", "list"]) == 0


def test_metrics_of_an_unknown_service_is_2_and_an_endpoint_that_does_not_answer_is_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    ctx = SimpleNamespace(service_names=["accounts"], pki=SimpleNamespace(paths=lambda name: SimpleNamespace(
        cert="c", key="k")), settings=SimpleNamespace(public_host="localhost"), metrics_port=lambda name: 1,
        ca_file="ca")
    stack = FakeStack()
    stack.context = lambda: ctx  # type: ignore[method-assign]
    on_stack(monkeypatch, stack)
    assert main(["metrics", "ledger"]) == 2
    assert "no service 'ledger'" in capsys.readouterr().err

    def unreachable(url: str, tls: Any) -> str:
        raise ConnectionRefusedError("refused")

    monkeypatch.setattr(cli, "scrape", unreachable)
    assert main(["metrics", "accounts"]) == 1
    assert "did not answer" in capsys.readouterr().err


def test_demo_that_fails_a_step_exits_2_without_claiming_success(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    stack = FakeStack({"components": {}, "credentials_file": "c", "pki_dir": "p"})
    stack.up = lambda: None  # type: ignore[attr-defined]
    on_stack(monkeypatch, stack)

    class Failing:
        def __init__(self, ctx: Any, say: Any) -> None:
            pass

        def run(self) -> None:
            raise DevstackError("the demo scenario failed: UNAVAILABLE: accounts", "see `bastion status`")

    monkeypatch.setattr(cli, "Scenario", Failing)
    assert main(["demo"]) == 2
    said = capsys.readouterr()
    assert "the demo scenario failed" in said.err and "succeeded" not in said.out
