"""A lab's verdict from its evidence (bastion/labs/base.py): held only on evidence of the defence and none of the
attack, a lab that could not finish never held, and the exit status of a run the worst of its labs."""

import pytest

from bastion.labs.base import Evidence, Outcome, exit_status, run_lab
from bastion.labs.platform import LabSetupError
from tests.unit.labs.fakes import console, lab, result


@pytest.mark.parametrize(("held", "outcome"), [
    ((None, True), Outcome.HELD),
    ((True, True, None), Outcome.HELD),
    ((True, False), Outcome.NOT_HELD),
    ((False, True), Outcome.NOT_HELD),
    ((None, None), Outcome.NOT_HELD),
    ((), Outcome.NOT_HELD),
])
def test_a_lab_holds_only_on_evidence_of_the_defence_and_none_of_the_attack(
    held: tuple[bool | None, ...], outcome: Outcome,
) -> None:
    assert result("a-lab", *held).outcome is outcome


def test_evidence_of_the_attack_outweighs_an_error_and_an_error_outweighs_evidence_of_the_defence() -> None:
    assert result("a-lab", True, False, error="then it broke").outcome is Outcome.NOT_HELD
    assert result("a-lab", True, error="then it broke").outcome is Outcome.NOT_RUN
    assert result("a-lab", None, error="it broke").outcome is Outcome.NOT_RUN
    assert result("a-lab", error="it broke at once").outcome is Outcome.NOT_RUN


def test_the_outcomes_are_the_documented_exit_statuses() -> None:
    assert (int(Outcome.HELD), int(Outcome.NOT_HELD), int(Outcome.NOT_RUN)) == (0, 1, 2)


def test_a_run_exits_with_its_worst_lab_the_attack_getting_through_first() -> None:
    assert exit_status({}) == 0
    assert exit_status({"a": result("a", True), "b": result("b", True)}) == 0
    assert exit_status({"a": result("a", True), "b": result("b", error="down")}) == 2
    assert exit_status({"a": result("a", error="down"), "b": result("b", False)}) == 1
    assert exit_status({"a": result("a", None), "b": result("b", True)}) == 1, "no evidence is not a pass"


def test_run_lab_prints_each_piece_of_evidence_with_its_mark_and_the_verdict() -> None:
    out, buffer = console()
    evidence = (Evidence("calibration", "OK"), Evidence("the attack", "REFUSED: [red]no[/red]", True))
    done = run_lab(lab("held-lab", evidence), session=None, console=out)  # type: ignore[arg-type]
    printed = buffer.getvalue()
    assert done.outcome is Outcome.HELD and done.evidence == evidence and done.error is None
    assert "· calibration: OK" in printed
    assert "✓ the attack: REFUSED: [red]no[/red]" in printed, "evidence is printed as written, never as markup"
    assert "HELD: the defence fired" in printed and "NOT HELD" not in printed


def test_run_lab_says_the_attack_got_through_when_evidence_shows_it() -> None:
    out, buffer = console()
    done = run_lab(lab("broken", (Evidence("defence", "fired", True), Evidence("attack", "OK: read it", False))),
                   session=None, console=out)  # type: ignore[arg-type]
    printed = buffer.getvalue()
    assert done.outcome is Outcome.NOT_HELD
    assert "✗ attack: OK: read it" in printed and "NOT HELD: the attack got through" in printed


def test_run_lab_says_when_there_is_no_evidence_of_the_defence() -> None:
    out, buffer = console()
    done = run_lab(lab("silent", (Evidence("context", "a log line"),)), session=None, console=out)  # type: ignore[arg-type]
    assert done.outcome is Outcome.NOT_HELD
    assert "NOT HELD: no evidence of the defence" in buffer.getvalue()


def test_a_set_up_failure_after_evidence_of_the_defence_is_not_run_with_its_message() -> None:
    out, buffer = console()
    done = run_lab(lab("cut-short", (Evidence("first attempt", "refused", True),),
                       LabSetupError("accounts refused the calibration call")), session=None, console=out)  # type: ignore[arg-type]
    assert done.outcome is Outcome.NOT_RUN
    assert done.error == "accounts refused the calibration call"
    assert "NOT RUN: accounts refused the calibration call" in buffer.getvalue()


def test_a_lab_that_crashes_is_not_run_in_one_line_naming_the_exception_never_held() -> None:
    out, buffer = console()
    done = run_lab(lab("crashing", (Evidence("first attempt", "refused", True),), KeyError("accounts")),
                   session=None, console=out)  # type: ignore[arg-type]
    printed = buffer.getvalue()
    assert done.outcome is Outcome.NOT_RUN
    assert done.error == "unexpected KeyError: 'accounts'"
    assert "NOT RUN: unexpected KeyError: 'accounts'" in printed and "Traceback" not in printed
    assert exit_status({"crashing": done}) == 2
