"""Service logs are JSON lines: whatever a caller or a forged event brought with it cannot end a line early, forge
a line of its own, or carry a terminal escape sequence into the file an operator reads."""

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from bastion import service_logs

HOSTILE = {
    "line break and a forged line": 'x"}\n{"level":"info","event":"call_allowed","principal":"admin"}',
    "terminal escape (clear screen, red)": "\x1b[2J\x1b[31mOK",
    "right-to-left override": "\u202egnp.exe",
    "carriage return over the line": "ok\rERROR",
    "NUL and DEL": "a\x00b\x7f",
}


@pytest.fixture()
def out() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    service_logs.configure("accounts", stream)
    try:
        yield stream
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)


def records(stream: io.StringIO) -> list[dict[str, object]]:
    lines = stream.getvalue().splitlines()
    return [json.loads(line) for line in lines]  # every line one JSON object, or this raises


def test_each_event_is_one_json_line_that_starts_with_when_how_bad_who_and_what(out: io.StringIO) -> None:
    structlog.get_logger("t").warning("call_refused", code="PERMISSION_DENIED", correlation_id="c1")
    [record] = records(out)
    assert list(record)[:4] == ["timestamp", "level", "service", "event"]
    assert record["service"] == "accounts" and record["level"] == "warning" and record["event"] == "call_refused"
    assert str(record["timestamp"]).endswith("Z") and record["code"] == "PERMISSION_DENIED"


@pytest.mark.parametrize("value", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_text_is_written_escaped_and_read_back_exactly(out: io.StringIO, value: str) -> None:
    structlog.get_logger("t").warning("event_rejected", claimed=value, detail=value)
    raw = out.getvalue()
    assert raw.count("\n") == 1 and raw.endswith("\n"), "one line, whatever the value held"
    assert raw.isascii() and all(char.isprintable() for char in raw[:-1]), "no control or non-ASCII character"
    [record] = records(out)
    assert record["claimed"] == record["detail"] == value


def test_standard_library_loggers_write_the_same_lines(out: io.StringIO) -> None:
    logging.getLogger("bastion.events.outbox").warning("outbox relay: %d events wait (%s)", 3, HOSTILE[
        "line break and a forged line"])
    logging.getLogger("bastion.events.outbox").debug("not written: below the level")
    [record] = records(out)
    assert record["logger"] == "bastion.events.outbox" and record["service"] == "accounts"
    assert record["event"] == f"outbox relay: 3 events wait ({HOSTILE['line break and a forged line']})"


def test_a_stack_trace_stays_inside_its_line(out: io.StringIO) -> None:
    try:
        raise RuntimeError("boom\nforged")
    except RuntimeError:
        structlog.get_logger("t").exception("call_crashed", method="/x")
        logging.getLogger("w").exception("worker_failed")
    crashed, failed = records(out)
    assert crashed["event"] == "call_crashed" and "RuntimeError: boom\nforged" in str(crashed["exception"])
    assert failed["logger"] == "w" and "Traceback" in str(failed["exception"])


def test_a_value_json_has_no_form_for_is_written_as_its_repr_escaped(out: io.StringIO) -> None:
    structlog.get_logger("t").warning("event_rejected", payload=b"\x1b[2J", sent={"at": object})
    [record] = records(out)
    assert record["payload"] == repr(b"\x1b[2J") and record["sent"] == {"at": repr(object)}


def test_a_field_named_service_cannot_make_a_line_pass_for_another_services(out: io.StringIO) -> None:
    structlog.get_logger("t").warning("call_refused", service="audit")
    [record] = records(out)
    assert record["service"] == "accounts"


def test_lines_below_the_level_are_not_written_and_those_at_it_are_from_either_kind_of_logger(
        out: io.StringIO) -> None:
    structlog.get_logger("t").debug("not_written")
    structlog.get_logger("t").info("written")
    logging.getLogger("bastion.events.outbox").info("written too")
    assert [record["event"] for record in records(out)] == ["written", "written too"]


def test_the_service_log_is_the_only_place_standard_library_lines_go() -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    earlier = io.StringIO()
    root.handlers[:] = [logging.StreamHandler(earlier)]  # e.g. a plain handler set up before, writing raw text
    try:
        service_logs.configure("accounts", io.StringIO())
        logging.getLogger("w").warning("forged\nline")
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)
    assert earlier.getvalue() == ""


def test_a_line_as_a_person_reads_it_is_level_event_then_the_fields_but_when_and_who() -> None:
    record = {"timestamp": "2026-11-28T14:00:00Z", "level": "warning", "service": "accounts",
              "event": "call_refused", "code": "PERMISSION_DENIED", "correlation_id": "c1"}
    assert service_logs.render(record) == "warning: call_refused code=PERMISSION_DENIED correlation_id=c1"


@pytest.mark.parametrize("value", [*HOSTILE.values(), "x principal=admin", 'a"b', "é"],
                         ids=[*HOSTILE.keys(), "a forged field", "a quote", "non-ASCII"])
def test_a_rendered_value_that_is_not_a_plain_word_is_quoted_and_escaped(value: str) -> None:
    rendered = service_logs.render({"level": "info", "event": "e", "claimed": value})
    assert rendered.isascii() and rendered.isprintable(), "nothing for a terminal to act on"
    assert rendered.startswith('info: e claimed="') and json.loads(rendered.removeprefix("info: e claimed=")) == value
