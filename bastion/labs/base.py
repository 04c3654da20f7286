"""What a lab is (an attack, the defence that should stop it, a probe that yields evidence), how one runs, and
how its verdict is printed."""

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum

from rich.console import Console
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table

from bastion.labs.platform import LabSetupError, Session


@dataclass(frozen=True)
class Evidence:
    """One observation. HELD is True when it shows the defence firing, False when it shows the attack getting
    through, None for context (a log line, an audit record, a calibration call) that decides nothing alone."""

    what: str
    observed: str
    held: bool | None = None


Probe = Callable[[Session], Iterator[Evidence]]


@dataclass(frozen=True)
class Lab:
    name: str
    title: str
    attack: str
    defence: str
    where: str  # the modules and files of the control, for the reader who wants to look
    expect: str  # what the defence answers with (a status, a reason) as the evidence names it
    probe: Probe


class Outcome(IntEnum):
    """A lab's verdict, which is also its exit status."""

    HELD = 0
    NOT_HELD = 1
    NOT_RUN = 2


@dataclass(frozen=True)
class LabResult:
    lab: Lab
    evidence: tuple[Evidence, ...]
    seconds: float
    error: str | None = None

    @property
    def outcome(self) -> Outcome:
        """Held only when some evidence shows the defence firing and none shows the attack getting through."""
        if any(item.held is False for item in self.evidence):
            return Outcome.NOT_HELD
        if self.error is not None:
            return Outcome.NOT_RUN
        if any(item.held for item in self.evidence):
            return Outcome.HELD
        return Outcome.NOT_HELD  # the attack left no trace of the defence: evidence missing


def run_lab(lab: Lab, session: Session, console: Console) -> LabResult:
    """Run LAB's probe, printing its attack, defence and each piece of evidence as it is observed."""
    console.print(f"\n[bold]{lab.name}[/bold]: {escape(lab.title)}")
    console.print(_rows(7, ("[bold]attack[/bold]", escape(lab.attack)), ("[bold]defence[/bold]", escape(lab.defence)),
                        ("", f"[dim]{escape(lab.where)}[/dim]"), ("[bold]expect[/bold]", escape(lab.expect))))
    started = time.monotonic()
    evidence: list[Evidence] = []
    error = None
    try:
        for item in lab.probe(session):
            evidence.append(item)
            mark = {True: "[green]✓[/green]", False: "[red]✗[/red]", None: "[dim]·[/dim]"}[item.held]
            console.print(_rows(1, (mark, f"{escape(item.what)}: {escape(item.observed)}")))
    except LabSetupError as problem:
        error = str(problem)
    except Exception as problem:  # a lab that crashed proved nothing: say why in one line, never a stack trace
        error = f"unexpected {type(problem).__name__}: {problem}"
    result = LabResult(lab, tuple(evidence), time.monotonic() - started, error)
    console.print(f"  {_verdict(result)}")
    return result


def _rows(label_width: int, *rows: tuple[str, str]) -> Padding:
    """Labels and texts side by side, each text wrapping under itself (markup in both)."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True, width=label_width)
    grid.add_column()
    for label, text in rows:
        grid.add_row(label, text)
    return Padding(grid, (0, 0, 0, 2))


def _verdict(result: LabResult) -> str:
    took = f"({result.seconds:.1f}s)"
    if result.outcome is Outcome.HELD:
        return f"[green]HELD[/green]: the defence fired {took}"
    if result.outcome is Outcome.NOT_RUN:
        return f"[yellow]NOT RUN[/yellow]: {escape(result.error or '')} {took}"
    why = "the attack got through" if any(e.held is False for e in result.evidence) else "no evidence of the defence"
    return f"[red]NOT HELD[/red]: {why} {took}"


def run_labs(labs: Sequence[Lab], session: Session, console: Console) -> dict[str, LabResult]:
    return {lab.name: run_lab(lab, session, console) for lab in labs}


def exit_status(results: Mapping[str, LabResult]) -> int:
    """1 if any lab did not hold (the attack got through or left no trace of the defence), else 2 if any could
    not run, else 0."""
    outcomes = {result.outcome for result in results.values()}
    for worst in (Outcome.NOT_HELD, Outcome.NOT_RUN):
        if worst in outcomes:
            return int(worst)
    return int(Outcome.HELD)
