"""Log lines: text with the request id and fields, or one JSON object per line."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from common.logs import REQUEST_ID, configure, fields


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """A root logger without pytest's handlers (configure() adds none beside a foreign
    one), put back afterwards."""
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    root.handlers[:] = []
    out = io.StringIO()
    configure("INFO", "text")
    root.handlers[0].setStream(out)  # type: ignore[attr-defined]
    yield out
    root.handlers[:] = saved
    root.setLevel(level)


def test_text_lines_carry_the_request_id_and_fields(stream: io.StringIO) -> None:
    log = logging.getLogger("t")
    log.info("no request here")
    token = REQUEST_ID.set("req-1")
    try:
        log.info("request finished", extra=fields(model="m", ttft_ms=12.25, tenant="a b"))
    finally:
        REQUEST_ID.reset(token)
    first, second = stream.getvalue().splitlines()
    assert first.endswith("t: no request here")
    assert second.endswith('t: [req-1] request finished model=m ttft_ms=12.2 tenant="a b"')


def test_json_lines_are_objects_with_fields_and_tracebacks(stream: io.StringIO) -> None:
    logging.getLogger().handlers[:] = []  # pytest's, added for the test's call
    configure("DEBUG", "json")
    logging.getLogger().handlers[0].setStream(stream)  # type: ignore[attr-defined]
    log = logging.getLogger("t")

    async def serve() -> None:  # a task inherits the id of the task that started it
        REQUEST_ID.set("req-2")
        await asyncio.create_task(asyncio.to_thread(log.debug, "in a thread"))
        log.info("done", extra=fields(completion_tokens=3, finish_reason="stop"))

    asyncio.run(serve())
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed: 你好")
    lines = [x for x in map(json.loads, stream.getvalue().splitlines()) if x["logger"] == "t"]
    assert [x["msg"] for x in lines] == ["in a thread", "done", "failed: 你好"]
    assert lines[0]["request_id"] == lines[1]["request_id"] == "req-2"
    assert "request_id" not in lines[2]
    assert lines[1]["completion_tokens"] == 3 and lines[1]["level"] == "INFO"
    assert lines[2]["exc"].endswith("ValueError: boom") and lines[2]["ts"].endswith("Z")


def test_a_foreign_handler_is_kept_and_none_added_beside_it(stream: io.StringIO) -> None:
    root = logging.getLogger()
    foreign = logging.NullHandler()
    root.handlers[:] = [foreign]
    configure("WARNING", "json")
    assert root.handlers == [foreign] and root.level == logging.WARNING


def test_an_unknown_format_is_refused(stream: io.StringIO) -> None:
    with pytest.raises(ValueError, match="text, json"):
        configure("INFO", "yaml")
