"""Declarative validation of JSON bodies and query strings.

A schema is a mapping of field name to :class:`F`. :func:`validate` checks every
field and raises one :class:`~gateway.errors.ValidationFailed` listing all the
fields at fault, so a client fixes its request in one go. Unknown fields are an
error unless the schema allows them: a typo must not be silently ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from gateway.errors import ValidationFailed

_MISSING: Final = object()


@dataclass(frozen=True, slots=True)
class F:
    """One field: its JSON type and constraints.

    ``kind`` is one of ``int``, ``str``, ``bool``, ``list``, ``dict``, ``float``
    or ``datetime`` (an ISO 8601 string with a UTC offset, parsed to an aware
    datetime). ``int`` never accepts ``true``/``false`` nor ``1.0``.
    """

    kind: type
    required: bool = True
    nullable: bool = False
    default: Any = _MISSING
    min: float | None = None
    max: float | None = None
    min_len: int | None = None
    max_len: int | None = None
    choices: tuple[Any, ...] | None = None
    pattern: str | None = None
    items: type | None = None

    @property
    def has_default(self) -> bool:
        return self.default is not _MISSING


def _type_name(kind: type) -> str:
    return {
        int: "integer",
        str: "string",
        bool: "boolean",
        list: "array",
        dict: "object",
        float: "number",
        datetime: "ISO 8601 datetime with offset",
    }.get(kind, kind.__name__)


def _is_kind(value: Any, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, kind)


def parse_datetime(value: Any) -> datetime | None:
    """An aware datetime from an ISO 8601 string, or None if it is not one."""
    if not isinstance(value, str):
        return None
    text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return parsed


def _check(name: str, value: Any, spec: F, errors: dict[str, str]) -> Any:
    if value is None:
        if spec.nullable:
            return None
        errors[name] = "must not be null"
        return None
    if spec.kind is datetime:
        parsed = parse_datetime(value)
        if parsed is None:
            errors[name] = "must be an ISO 8601 datetime with a UTC offset"
        return parsed
    if not _is_kind(value, spec.kind):
        errors[name] = f"must be {_type_name(spec.kind)}"
        return None
    if spec.kind in (int, float):
        if spec.min is not None and value < spec.min:
            errors[name] = f"must be >= {spec.min:g}"
        elif spec.max is not None and value > spec.max:
            errors[name] = f"must be <= {spec.max:g}"
    if spec.kind in (str, list, dict):
        if spec.kind is str:
            value = value.strip()
        if spec.min_len is not None and len(value) < spec.min_len:
            errors[name] = f"length must be >= {spec.min_len}"
        elif spec.max_len is not None and len(value) > spec.max_len:
            errors[name] = f"length must be <= {spec.max_len}"
    if spec.kind is str and spec.pattern is not None and not re.fullmatch(spec.pattern, value):
        errors[name] = "has an invalid format"
    if spec.choices is not None and value not in spec.choices:
        errors[name] = "must be one of: " + ", ".join(str(c) for c in spec.choices)
    if spec.kind is list and spec.items is not None:
        for i, item in enumerate(value):
            if not _is_kind(item, spec.items):
                errors[name] = f"item {i} must be {_type_name(spec.items)}"
                break
    return value


def validate(body: Any, schema: Mapping[str, F], *, allow_extra: bool = False) -> dict[str, Any]:
    """Check ``body`` against ``schema``; return the cleaned values or raise ValidationFailed."""
    if not isinstance(body, dict):
        raise ValidationFailed(
            "request body must be a JSON object", fields={"body": "must be an object"}
        )
    errors: dict[str, str] = {}
    out: dict[str, Any] = {}
    if not allow_extra:
        for key in body:
            if key not in schema:
                errors[key] = "unknown field"
    for name, spec in schema.items():
        if name not in body:
            if spec.default is not _MISSING:
                out[name] = spec.default
            elif spec.required:
                errors[name] = "is required"
            continue
        out[name] = _check(name, body[name], spec, errors)
    if errors:
        raise ValidationFailed(fields=errors)
    return out


def query_int(
    query: Mapping[str, str], name: str, default: int | None, *, lo: int, hi: int
) -> int | None:
    """An integer query parameter within [lo, hi], or ``default`` when absent."""
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationFailed(fields={name: "must be an integer"}) from None
    if not lo <= value <= hi:
        raise ValidationFailed(fields={name: f"must be between {lo} and {hi}"})
    return value


def path_int(value: str, name: str = "id") -> int:
    """A positive integer path segment; anything else is a 404 (the resource cannot exist)."""
    from gateway.errors import NotFound

    if not value.isdigit() or len(value) > 18:
        raise NotFound(f"{name} not found")
    return int(value)
