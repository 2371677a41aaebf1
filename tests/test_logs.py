"""Every process logs one JSON object per line, with the call's extra fields as its own."""

from __future__ import annotations

import logging

import orjson
import pytest

from stack.logs import JsonFormatter

pytestmark = pytest.mark.unit


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("flashsale.test", logging.WARNING, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_one_json_object_per_line_with_extra_fields() -> None:
    line = JsonFormatter().format(
        _record("order %s\nforged line", "42", order_id="42", request_id="ab-1")
    )
    assert "\n" not in line  # a newline in a value cannot forge a second line
    data = orjson.loads(line)
    assert data["msg"] == "order 42\nforged line"
    assert data["order_id"] == "42" and data["request_id"] == "ab-1"
    assert {"ts", "level", "pid", "logger"} <= set(data)
    assert data["level"] == "WARNING" and data["logger"] == "flashsale.test"


def test_exception_is_a_field() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record("failed")
        import sys

        record.exc_info = sys.exc_info()
    data = orjson.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in data["exc"]
