"""A setting out of its range is bad input: the command names the variable, the value and the rule, exit 2."""

import pytest

from bastion.cli import main


@pytest.mark.parametrize(("variable", "value", "rule"), [
    ("BASTION_TRACE_SAMPLE_RATIO", "2", "less than or equal to 1"),
    ("BASTION_TRACE_SPANS_PER_SECOND", "0", "greater than 0"),
    ("BASTION_SEQUENCE_GAP_ALERT_SECONDS", "soon", "a valid number"),
    ("BASTION_SEQUENCE_GAP_ALERT_SECONDS", "0", "greater than 0"),
    ("BASTION_SEQUENCE_GAP_ALERT_SECONDS", "86401", "less than or equal to 86400"),
])
def test_a_setting_out_of_range_is_named_and_refused(variable: str, value: str, rule: str,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(variable, value)
    assert main(["status"]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert f"bastion status: invalid setting {variable}='{value}'" in said and rule in said
    assert "unexpected" not in said and "please report" not in said
