"""Service logs: one JSON object per line on standard output, which the devstack writes to the service's log file
(`STATE/logs/SERVICE.log`) and a log shipper would read as it is.

Every line carries `timestamp` (ISO 8601, UTC), `level`, `service` and `event` first, then the event's fields.
Lines of the standard library's loggers (the outbox relay, librdkafka's messages) go through the same renderer,
with `logger` naming where they came from. Anything a caller or a forged event brought with it is a JSON string:
a line break, a terminal escape sequence or a right-to-left override is written escaped (`\\n`, `\\u001b`,
`\\u202e`), so no input can end a line early, forge a line of its own or repaint an operator's terminal.
"""

import json
import logging
import sys
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor

FIRST = ("timestamp", "level", "service", "event")


def _serialise(event: Any, **_: Any) -> str:
    """JSON with every character outside printable ASCII escaped; a value JSON has no form for becomes its repr."""
    return json.dumps(event, ensure_ascii=True, default=repr, separators=(",", ":"))


def _service_and_order(service: str) -> Callable[[Any, str, EventDict], EventDict]:
    def processor(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
        event_dict["service"] = service
        ordered: MutableMapping[str, Any] = {key: event_dict.pop(key) for key in FIRST if key in event_dict}
        ordered.update(event_dict)
        return dict(ordered)
    return processor


def configure(service: str, stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Send SERVICE's structlog and standard-library log records, from LEVEL up, to STREAM (standard output by
    default) as JSON lines. Call once, first thing in a service's `main`."""
    out = stream or sys.stdout
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    finish: list[Processor] = [
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        _service_and_order(service),
        structlog.processors.JSONRenderer(serializer=_serialise),
    ]
    structlog.configure(
        processors=[*shared, *finish],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *finish],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def render(record: Mapping[str, Any]) -> str:
    """A JSON log line as a person reads it: `warning: call_refused code=... reason=...` (level, event, then the
    fields but the timestamp and the service); a plain word as it is, any other value as JSON, escaped."""
    fields = " ".join(f"{key}={_field(value)}" for key, value in record.items() if key not in FIRST)
    return f"{record.get('level', '?')}: {record.get('event', '?')} {fields}".strip()


def _field(value: Any) -> str:
    if isinstance(value, str) and value and value.isascii() and value.isprintable() and not any(
            char in value for char in " \"'="):
        return value
    return json.dumps(value, ensure_ascii=True)

