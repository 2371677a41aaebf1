"""Declarative validation of JSON bodies, query strings and path ids — and their JSON Schema.

A schema is a mapping of field name to :class:`F` (or an :class:`Obj`, which adds
rules across fields). :func:`validate` checks every field and raises one
:class:`~flashsale.errors.ValidationFailed` listing all the fields at fault, so a
client fixes its request in one go. Unknown fields are an error unless the schema
allows them: a typo must not be silently ignored.

The same definitions generate the OpenAPI document (:func:`json_schema`,
:func:`object_schema`): every constraint :func:`validate` enforces is stated
there, and nothing the document promises is refused. Patterns are matched with
``re.search`` on the very text the document carries, so the two cannot drift.
Rules the document cannot state (one date after another, a total below a price)
are the only 422s a schema-valid request can meet.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import cache
from typing import Any, Final

from flashsale.errors import NotFound, ValidationFailed

_MISSING: Final = object()

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1  # PostgreSQL BIGINT: every integer a client sends fits one
MAX_KEY_LEN: Final = 64  # keys of free-form maps (attributes, specification, address)
MAX_FREE_TEXT: Final = 2000  # string values inside free-form maps

# No NUL anywhere: PostgreSQL text cannot hold one. Blank means ASCII whitespace only,
# spelled out because regex engines disagree on what ``\s`` covers.
WHITESPACE: Final = " \t\n\r\x0b\x0c"
_NO_NUL: Final = r"^[^\x00]*$"
_NOT_BLANK: Final = r"^[^\x00]*[^\x00 \t\n\r\x0b\x0c][^\x00]*$"
INT32_MAX: Final = 2**31 - 1  # row versions are PostgreSQL INTEGER
_YEAR = r"(19[7-9][0-9]|2[0-9]{3})"  # 1970-2999: far from datetime's limits either way
_DATE = _YEAR + r"-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
_HMS = r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?"
_TIME = _HMS + r"([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
DATETIME_PATTERN: Final = "^" + _DATE + "[Tt]" + _TIME + "$"
DATE_PATTERN: Final = "^" + _DATE + "$"


class DateOrDatetime:
    """Kind marker: an ISO 8601 datetime with offset, or a bare date (query bounds)."""


@dataclass(frozen=True, slots=True)
class F:
    """One field: its JSON type and constraints.

    ``kind`` is one of ``int``, ``str``, ``bool``, ``list``, ``dict``, ``float``,
    ``datetime`` (an RFC 3339 string with a UTC offset, years 1970-2999, parsed to
    an aware datetime) or :class:`DateOrDatetime`. ``int`` never accepts
    ``true``/``false`` nor ``1.5`` (``3.0`` is 3) and stays within BIGINT. Strings never hold
    NUL; one with ``min_len >= 1`` must not be blank; values come back stripped.
    ``pattern`` is a regular expression the whole string must match.
    A ``list`` has ``items`` (a type, a spec, or alternative specs); a ``dict`` has
    ``fields`` (a nested object) or is a free-form map whose keys are short
    strings and whose values match one of ``values`` (default: a JSON scalar).
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
    items: type | F | tuple[F, ...] | None = None
    fields: Mapping[str, F] | None = None
    values: tuple[F, ...] | None = None
    doc: str | None = None

    @property
    def has_default(self) -> bool:
        return self.default is not _MISSING


@dataclass(frozen=True, slots=True)
class Alt:
    """One acceptable combination: ``present`` fields given (not null), ``absent`` ones not sent."""

    present: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()


@dataclass(frozen=True)
class Obj(Mapping[str, F]):
    """An object schema with rules across its fields.

    ``alts``: when given, the object must match at least one :class:`Alt`.
    ``allow_extra``: fields not listed are accepted (and dropped).
    """

    fields: Mapping[str, F]
    alts: tuple[Alt, ...] = ()
    allow_extra: bool = False

    def __getitem__(self, key: str) -> F:
        return self.fields[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)


_SCALAR_VALUES: Final = (
    F(str, nullable=True, max_len=MAX_FREE_TEXT),
    F(float, nullable=True),
    F(bool, nullable=True),
)


def _type_name(kind: type) -> str:
    return {
        int: "integer",
        str: "string",
        bool: "boolean",
        list: "array",
        dict: "object",
        float: "number",
        datetime: "RFC 3339 datetime with offset, years 1970-2999",
        DateOrDatetime: "RFC 3339 datetime with offset or a date, years 1970-2999",
    }.get(kind, kind.__name__)


def _is_kind(value: Any, kind: type) -> bool:
    if kind is int:  # JSON Schema's integer: 3.0 is one (and comes back as 3)
        if isinstance(value, float):
            return value.is_integer()
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind in (datetime, DateOrDatetime):
        return isinstance(value, str)
    return isinstance(value, kind)


def string_pattern(spec: F) -> str:
    """The anchored pattern a string of ``spec`` must match (as published)."""
    if spec.pattern is not None:  # written so that it never matches NUL
        return "^(?:" + spec.pattern + ")$"
    if spec.min_len is not None and spec.min_len >= 1:
        return _NOT_BLANK
    return _NO_NUL


@cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _matches(pattern: str, value: str) -> bool:
    return "\x00" not in value and _compiled(pattern).search(value) is not None


def parse_datetime(value: Any) -> datetime | None:
    """An aware datetime from an RFC 3339 string (years 1970-2999), or None if it is not one."""
    if not isinstance(value, str) or not _matches(DATETIME_PATTERN, value):
        return None
    text = value.strip(WHITESPACE).replace("t", "T").replace("z", "Z")
    try:
        return datetime.fromisoformat(text)
    except ValueError:  # 31 February and the like
        return None


def parse_date(value: Any) -> date | None:
    """A date from ``YYYY-MM-DD`` (years 1970-2999), or None if it is not one."""
    if not isinstance(value, str) or not _matches(DATE_PATTERN, value):
        return None
    try:
        return date.fromisoformat(value.strip(WHITESPACE))
    except ValueError:
        return None


def _int_bounds(spec: F) -> tuple[float, float]:
    lo = INT64_MIN if spec.min is None else max(spec.min, INT64_MIN)
    hi = INT64_MAX if spec.max is None else min(spec.max, INT64_MAX)
    return lo, hi


def _check_alternatives(name: str, value: Any, specs: tuple[F, ...], errors: dict[str, str]) -> Any:
    for spec in specs:
        trial: dict[str, str] = {}
        out = _check(name, value, spec, trial)
        if not trial:
            return out
    errors[name] = "must be one of: " + ", ".join(
        _type_name(s.kind) + (" or null" if s.nullable else "") for s in specs
    )
    return None


def _check_map(name: str, value: dict[str, Any], spec: F, errors: dict[str, str]) -> Any:
    if spec.fields is not None:
        try:
            return validate(value, spec.fields)
        except ValidationFailed as exc:
            errors.update({f"{name}.{k}": m for k, m in (exc.fields or {}).items()})
            return None
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not _matches(_NO_NUL, key) or len(key) > MAX_KEY_LEN:
            errors[name] = f"keys must be at most {MAX_KEY_LEN} characters, without NUL"
            return None
        trial: dict[str, str] = {}
        out[key] = _check_alternatives(key, item, spec.values or _SCALAR_VALUES, trial)
        if trial:
            errors[name] = f"value of {key!r} " + trial[key]
            return None
    return out


def _check(name: str, value: Any, spec: F, errors: dict[str, str]) -> Any:
    if value is None:
        if spec.nullable:
            return None
        errors[name] = "must not be null"
        return None
    if not _is_kind(value, spec.kind):
        errors[name] = f"must be {_type_name(spec.kind)}"
        return None
    if spec.kind is datetime:
        parsed = parse_datetime(value)
        if parsed is None:
            errors[name] = "must be an RFC 3339 datetime with a UTC offset, years 1970-2999"
        return parsed
    if spec.kind is DateOrDatetime:
        either: datetime | date | None = parse_datetime(value) or parse_date(value)
        if either is None:
            errors[name] = "must be an RFC 3339 datetime with offset or a date, years 1970-2999"
        return either
    if spec.kind is int:
        value = int(value)
        lo, hi = _int_bounds(spec)
        if value < lo:
            errors[name] = f"must be >= {lo:g}" if spec.min is not None else f"must be >= {lo}"
        elif value > hi:
            errors[name] = f"must be <= {hi:g}" if spec.max is not None else f"must be <= {hi}"
    if spec.kind is float:
        if spec.min is not None and value < spec.min:
            errors[name] = f"must be >= {spec.min:g}"
        elif spec.max is not None and value > spec.max:
            errors[name] = f"must be <= {spec.max:g}"
    if spec.kind in (str, list, dict):
        if spec.min_len is not None and len(value) < spec.min_len:
            errors[name] = f"length must be >= {spec.min_len}"
        elif spec.max_len is not None and len(value) > spec.max_len:
            errors[name] = f"length must be <= {spec.max_len}"
    if spec.kind is str:
        if not _matches(string_pattern(spec), value):
            errors[name] = (
                "must not contain NUL" if "\x00" in value else "has an invalid format or is blank"
            )
        elif spec.choices is None:
            value = value.strip(WHITESPACE)
    if spec.choices is not None and value not in spec.choices:
        errors[name] = "must be one of: " + ", ".join(str(c) for c in spec.choices)
    if spec.kind is list and spec.items is not None:
        items = spec.items
        cleaned = []
        for i, item in enumerate(value):
            label = f"{name}[{i}]"
            if isinstance(items, F):
                cleaned.append(_check(label, item, items, errors))
            elif isinstance(items, tuple):
                cleaned.append(_check_alternatives(label, item, items, errors))
            elif _is_kind(item, items):
                cleaned.append(_check(label, item, F(items), errors))
            else:
                errors[name] = f"item {i} must be {_type_name(items)}"
                break
        value = cleaned
    if spec.kind is dict and name not in errors:
        value = _check_map(name, value, spec, errors)
    return value


def _present(out: Mapping[str, Any], name: str) -> bool:
    return out.get(name) is not None


def validate(body: Any, schema: Mapping[str, F], *, allow_extra: bool = False) -> dict[str, Any]:
    """Check ``body`` against ``schema``; return the cleaned values or raise ValidationFailed."""
    if not isinstance(body, dict):
        raise ValidationFailed(
            "request body must be a JSON object", fields={"body": "must be an object"}
        )
    obj = schema if isinstance(schema, Obj) else None
    errors: dict[str, str] = {}
    out: dict[str, Any] = {}
    if not (allow_extra or (obj is not None and obj.allow_extra)):
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
    if (
        obj is not None
        and obj.alts
        and not errors
        and not any(
            all(_present(out, p) for p in alt.present) and not any(a in body for a in alt.absent)
            for alt in obj.alts
        )
    ):
        names = sorted({n for alt in obj.alts for n in (*alt.present, *alt.absent)})
        errors.update(dict.fromkeys(names, "give " + _describe(obj.alts)))
    if errors:
        raise ValidationFailed(fields=errors)
    return out


def _describe(alts: Sequence[Alt]) -> str:
    parts = []
    for alt in alts:
        text = " and ".join(alt.present)
        if alt.absent:
            text += " without " + ", ".join(alt.absent)
        parts.append(text)
    return " or ".join(parts)


def validate_query(query: Mapping[str, str], schema: Mapping[str, F]) -> dict[str, Any]:
    """Check the declared query parameters (others are ignored); an empty value is absent.

    An ``int`` is ASCII digits (an optional ``-``) within its bounds; a ``bool`` is
    ``true`` or ``false``; everything else is checked as the JSON string it is.
    """
    body: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name, spec in schema.items():
        raw = query.get(name)
        if raw is None or raw == "":
            continue
        if spec.kind is int:
            if not re.fullmatch(r"-?[0-9]{1,19}", raw):
                errors[name] = "must be an integer"
                continue
            body[name] = int(raw)
        elif spec.kind is bool:
            if raw not in ("true", "false"):
                errors[name] = "must be true or false"
                continue
            body[name] = raw == "true"
        else:
            body[name] = raw
    try:
        out = validate(body, schema, allow_extra=True)
    except ValidationFailed as exc:
        errors.update(exc.fields or {})
        out = {}
    if errors:
        raise ValidationFailed(fields=errors)
    return out


def date_bound(value: datetime | date | None, *, end: bool) -> datetime | None:
    """A query bound: a datetime as given; a date (years <= 2999, so +1 day never overflows)
    as UTC midnight — of the next day for an ``end`` bound, so that the date is included."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.combine(value + timedelta(days=1 if end else 0), time(), tzinfo=UTC)


def path_int(value: str, name: str = "id") -> int:
    """A numeric path id (``gateway.shapes.PathId``): a row of a BIGINT primary key, so
    anything but ASCII digits from 1 to :data:`INT64_MAX` is a 404."""
    if not (value.isascii() and value.isdigit()) or len(value) > 19:
        raise NotFound(f"{name} not found")
    number = int(value)
    if not 1 <= number <= INT64_MAX:
        raise NotFound(f"{name} not found")
    return number


def path_text(value: str, name: str, *, spec: F) -> str:
    """A textual path parameter matching ``spec``, else a 404 "``name`` not found"."""
    errors: dict[str, str] = {}
    _check(name, value, spec, errors)
    if errors:
        raise NotFound(f"{name} not found")
    return value


# ---------------------------------------------------------------------------
# The published side: JSON Schema (OpenAPI 3.1) for the same definitions.

_JSON_TYPES: Final[dict[type, str]] = {
    int: "integer",
    float: "number",
    str: "string",
    bool: "boolean",
    list: "array",
    dict: "object",
    datetime: "string",
    DateOrDatetime: "string",
}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    if "enum" in schema:
        schema["enum"] = [*schema["enum"], None]
    if "type" in schema:
        schema["type"] = [schema["type"], "null"]
        return schema
    return {"anyOf": [schema, {"type": "null"}]}


def json_schema(spec: F, *, nullable: bool | None = None) -> dict[str, Any]:
    """The JSON Schema of one field: exactly what :func:`_check` accepts."""
    kind = spec.kind
    out: dict[str, Any]
    if kind is datetime:
        out = {"type": "string", "format": "date-time", "pattern": DATETIME_PATTERN}
    elif kind is DateOrDatetime:
        out = {
            "anyOf": [
                {"type": "string", "format": "date-time", "pattern": DATETIME_PATTERN},
                {"type": "string", "format": "date", "pattern": DATE_PATTERN},
            ]
        }
    else:
        out = {"type": _JSON_TYPES[kind]}
    if kind is int:
        lo, hi = _int_bounds(spec)
        out["minimum"], out["maximum"] = int(lo), int(hi)
    if kind is float:
        if spec.min is not None:
            out["minimum"] = spec.min
        if spec.max is not None:
            out["maximum"] = spec.max
    lengths: dict[type, str] = {str: "Length", list: "Items", dict: "Properties"}
    length = lengths.get(kind)
    if length is not None:
        if spec.min_len is not None:
            out["min" + length] = spec.min_len
        if spec.max_len is not None:
            out["max" + length] = spec.max_len
    if kind is str:
        out["pattern"] = string_pattern(spec)
    if spec.choices is not None:
        out["enum"] = list(spec.choices)
    if kind is list and spec.items is not None:
        items = spec.items
        if isinstance(items, F):
            out["items"] = json_schema(items)
        elif isinstance(items, tuple):
            out["items"] = {"anyOf": [json_schema(s) for s in items]}
        else:
            out["items"] = json_schema(F(items))
    if kind is dict:
        if spec.fields is not None:
            out.update(object_schema(spec.fields))
        else:
            out["propertyNames"] = {"maxLength": MAX_KEY_LEN, "pattern": _NO_NUL}
            out["additionalProperties"] = {
                "anyOf": [json_schema(s) for s in spec.values or _SCALAR_VALUES]
            }
    if spec.has_default and spec.default is not None:
        out["default"] = spec.default
    if spec.doc is not None:
        out["description"] = spec.doc
    if spec.nullable if nullable is None else nullable:
        out = _nullable(out)
    return out


def object_schema(schema: Mapping[str, F], *, allow_extra: bool = False) -> dict[str, Any]:
    """The JSON Schema of an object validated by :func:`validate` with ``schema``."""
    obj = schema if isinstance(schema, Obj) else None
    out: dict[str, Any] = {
        "type": "object",
        "properties": {name: json_schema(f) for name, f in schema.items()},
        "required": [n for n, f in schema.items() if f.required and not f.has_default],
        "additionalProperties": allow_extra or (obj is not None and obj.allow_extra),
    }
    if obj is not None and obj.alts:
        out["anyOf"] = [
            {
                "required": list(alt.present),
                "properties": {p: json_schema(schema[p], nullable=False) for p in alt.present},
                **(
                    {"not": {"anyOf": [{"required": [a]} for a in alt.absent]}}
                    if alt.absent
                    else {}
                ),
            }
            for alt in obj.alts
        ]
    return out
