"""Formatting Kafka's storage creates the admin's SCRAM credential (a super user): its password reaches the storage
tool through a 0600 argument file, never its command line, which any local user reads while the tool runs."""

import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bastion.devstack.components import kafka
from bastion.devstack.errors import ComponentStartError

SECRET = "generated-Admin_pass-0123456789"


class StorageTool:
    """Stands in for `subprocess.run` of the storage tool: notes each command line and the argument file it names."""

    def __init__(self, returncode: int = 0) -> None:
        self.returncode = returncode
        self.argv: list[str] = []
        self.argument_file: Path | None = None
        self.file_mode = 0
        self.file_text = ""

    def __call__(self, argv: list[str], **_options: Any) -> subprocess.CompletedProcess[str]:
        self.argv = list(argv)
        [named] = [argument for argument in argv if argument.startswith("@")]
        self.argument_file = Path(named[1:])
        self.file_mode = stat.S_IMODE(self.argument_file.stat().st_mode)
        self.file_text = self.argument_file.read_text()
        return subprocess.CompletedProcess(argv, self.returncode, "", "storage tool failed" if self.returncode else "")


def formatting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tool: StorageTool) -> kafka.Kafka:
    monkeypatch.setattr(kafka.subprocess, "run", tool)
    monkeypatch.setattr(kafka, "find_java", lambda _home: Path("/usr/bin/java"))
    ctx = SimpleNamespace(
        credentials=SimpleNamespace(kafka={kafka.ADMIN: SECRET}), settings=SimpleNamespace(java_home=None),
        distribution_dir=lambda _name: tmp_path / "dist",
        layout=SimpleNamespace(component_conf=lambda _name: tmp_path / "conf",
                               component_data=lambda _name: tmp_path / "data"))
    (tmp_path / "conf").mkdir()
    return kafka.Kafka(ctx)  # type: ignore[arg-type]


def test_the_admin_password_reaches_the_storage_tool_only_through_a_private_argument_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tool = StorageTool()
    formatting(tmp_path, monkeypatch, tool)._format()
    assert not any(SECRET in argument for argument in tool.argv)
    assert tool.argv[-1] == f"@{tool.argument_file}", "the tool and its arguments come from the file"
    assert tool.file_mode == 0o600
    lines = tool.file_text.splitlines()
    assert lines[:2] == ['"kafka.tools.StorageTool"', '"format"']
    assert f'"SCRAM-SHA-512=[name={kafka.ADMIN},password={SECRET}]"' in lines
    assert tool.argument_file is not None and not tool.argument_file.exists(), "removed once the tool has run"


def test_the_argument_file_is_removed_when_formatting_fails_too(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    tool = StorageTool(returncode=1)
    with pytest.raises(ComponentStartError, match="formatting Kafka's storage failed"):
        formatting(tmp_path, monkeypatch, tool)._format()
    assert tool.argument_file is not None and not tool.argument_file.exists()


def test_each_argument_is_quoted_on_its_own_line_with_quotes_and_backslashes_escaped() -> None:
    # As the java launcher reads an argument file (checked by hand with a class printing its arguments: each came
    # back as written, spaces, quotes, backslashes, a leading # and an empty one included).
    assert kafka.java_argument_file(["kafka.Main", "a b", 'say "x"', "C:\\dir", "#not a comment", ""]) == (
        '"kafka.Main"\n"a b"\n"say \\"x\\""\n"C:\\\\dir"\n"#not a comment"\n""\n')
    with pytest.raises(ValueError, match="line break"):
        kafka.java_argument_file(["two\nlines"])
