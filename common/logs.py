"""Logging for every npuserve process: text or JSON lines, and the request id on every line
logged while a request is being handled.

    configure("INFO", "json")
    REQUEST_ID.set("req-42")          # in the task serving the request (gateway.context)
    log.info("queued")                # {"ts": ..., "level": "INFO", ..., "request_id": "req-42"}
    log.info("done", extra=fields(model="m", completion_tokens=12))

REQUEST_ID is a context variable: set in the task serving a request (each RPC has its own),
it holds for the rest of that task and the tasks it starts. `fields(...)` become JSON keys,
or `key=value` pairs after the message in text.
"""

from __future__ import annotations

import json
import logging
import time
from contextvars import ContextVar
from typing import Any

FORMATS = ("text", "json")
REQUEST_ID: ContextVar[str] = ContextVar("npuserve_request_id", default="")
"""The id of the request the current task serves ("" outside one)."""
_FIELDS = "npuserve_fields"


def fields(**values: Any) -> dict[str, Any]:
    """`extra=` for a log call whose values a machine should read as fields."""
    return {_FIELDS: values}


_make_record = logging.getLogRecordFactory()


def _record(*args: Any, **kwargs: Any) -> logging.LogRecord:
    """Every record carries `request_id`, whichever handler formats it."""
    record = _make_record(*args, **kwargs)
    record.request_id = REQUEST_ID.get()
    return record


logging.setLogRecordFactory(_record)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: [request id] message key=value ...`"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 -- logging's name
        rid = getattr(record, "request_id", "")
        if rid:
            record.message = f"[{rid}] {record.message}"
        extra = getattr(record, _FIELDS, None)
        if extra:
            record.message += " " + " ".join(f"{k}={_text(v)}" for k, v in extra.items())
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (RFC 3339, UTC), level, logger, msg, request_id when
    there is one, the call's fields, and exc for a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "msg": record.getMessage(),
        }
        if rid := getattr(record, "request_id", ""):
            out["request_id"] = rid
        out.update(getattr(record, _FIELDS, None) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def _text(value: Any) -> str:
    text = f"{value:.1f}" if isinstance(value, float) else str(value)
    return json.dumps(text, ensure_ascii=False) if not text or " " in text else text


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stderr handler configure() installs (and replaces on a second call)."""


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Log to stderr at `level` in `fmt` ("text" or "json"). As logging.basicConfig, it
    adds no handler to a root logger that has one of someone else's (a test runner's)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    if not root.handlers:
        handler = _Handler()
        handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
        root.addHandler(handler)
    root.setLevel(level.upper())
