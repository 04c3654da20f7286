"""Stand-ins the lab tests share: a lab around a probe of the test's own, a finished result, a gRPC error."""

import io
from collections.abc import Iterable, Iterator
from typing import Any

import grpc
from rich.console import Console

from bastion.labs.base import Evidence, Lab, LabResult


def lab(name: str = "a-lab", evidence: Iterable[Evidence] = (), error: BaseException | None = None) -> Lab:
    """A lab whose probe yields EVIDENCE, then raises ERROR if given."""

    def probe(session: Any) -> Iterator[Evidence]:
        yield from evidence
        if error is not None:
            raise error

    return Lab(name, f"the title of {name}", attack="an attack", defence="a defence", where="somewhere.py",
               expect="REFUSED", probe=probe)


def result(name: str, *held: bool | None, error: str | None = None) -> LabResult:
    """A finished run of lab NAME with one piece of evidence per HELD value."""
    return LabResult(lab(name), tuple(Evidence(f"step {i}", "seen", value) for i, value in enumerate(held)), 0.1,
                     error)


def console() -> tuple[Console, io.StringIO]:
    """A wide console writing to a buffer, so that each printed line stays one line."""
    out = io.StringIO()
    return Console(file=out, width=300, highlight=False), out


class RpcError(grpc.RpcError):
    """A gRPC call that ended with CODE, as a stub raises it."""

    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()
