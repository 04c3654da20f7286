"""The scorecard of `bastion lab run --all` (bastion/labs/scorecard.py): a concern is held only when every lab
proving it ran and held; one line per concern, naming the labs that did not hold and why."""

import re

import pytest

from bastion.labs import LABS, find
from bastion.labs.scorecard import CONCERNS, SECTIONS, Concern, Status, concerns_of, print_scorecard, status_of
from tests.unit.labs.fakes import console, result

BOTH = Concern("Two labs prove it", ("first", "second"))


def test_a_concern_is_held_when_every_lab_proving_it_held() -> None:
    assert status_of(BOTH, {"first": result("first", True), "second": result("second", None, True)}) is Status.HELD


@pytest.mark.parametrize("second", [
    result("second", True, False),
    result("second", None),
    result("second", True, error="the stack stopped"),
], ids=["attack-got-through", "no-evidence", "not-run"])
def test_one_lab_that_did_not_hold_fails_the_concern(second: object) -> None:
    assert status_of(BOTH, {"first": result("first", True), "second": second}) is Status.NOT_HELD  # type: ignore[dict-item]


def test_a_lab_that_was_not_run_at_all_fails_the_concern() -> None:
    assert status_of(BOTH, {"first": result("first", True)}) is Status.NOT_HELD
    assert status_of(BOTH, {}) is Status.NOT_HELD


def test_a_concern_no_lab_proves_is_not_covered_whatever_ran() -> None:
    assert status_of(Concern("Organisational", not_covered="people"), {"first": result("first", True)}) \
        is Status.NOT_COVERED


def test_the_scorecard_prints_one_line_per_concern_with_the_labs_that_did_not_hold() -> None:
    results = {lab.name: result(lab.name, True) for lab in LABS}
    results["forged-token"] = result("forged-token", False)
    results["foreign-audience"] = result("foreign-audience", error="keycloak down")
    del results["rate-limit"]
    out, buffer = console()
    print_scorecard(results, out)
    lines = buffer.getvalue().splitlines()
    for concern in CONCERNS:
        [line] = [line for line in lines if f" {concern.title}: " in line]
        assert re.match(rf"\s+{status_of(concern, results).value}\s", line), line
    [tokens] = [line for line in lines if " Token leakage: " in line]
    assert tokens.split()[:2] == ["not", "held"]
    assert "forged-token (not held), foreign-audience (not run)" in tokens
    [limit] = [line for line in lines if " Lack of rate limiting: " in line]
    assert "not held" in limit and "rate-limit (not run)" in limit
    [replay] = [line for line in lines if " Replay attacks: " in line]
    assert re.match(r"\s+held\s+Replay attacks: replayed-event$", replay), replay
    [cors] = [line for line in lines if " Improper CORS configuration: " in line]
    assert "not covered" in cors and "no HTTP or browser-facing API" in cors
    assert [line.strip() for line in lines if line and not line.startswith(" ")][1:] == \
        [section for section, _ in SECTIONS]


def test_concerns_of_names_the_rows_a_lab_proves_and_nothing_for_a_stranger() -> None:
    assert concerns_of("revoked-session") == ["Temporal authorization issues (decisions on outdated state)",
                                              "Fail-open security models", "Session management"]
    assert concerns_of("no-such-lab") == []


def test_every_lab_proves_a_concern_and_every_concern_names_only_labs_of_the_catalogue() -> None:
    assert len({lab.name for lab in LABS}) == len(LABS)
    assert all(concerns_of(lab.name) for lab in LABS)
    assert all(find(name) is not None for concern in CONCERNS for name in concern.labs)
    assert all(bool(concern.labs) != bool(concern.not_covered) for concern in CONCERNS)
