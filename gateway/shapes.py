"""Request and response shapes as typed definitions (msgspec Structs).

A request body is a :class:`Body` subclass: its fields, with ``Annotated[..., Meta(...)]``
bounds, are the one definition that both the handler receives (:func:`read_body` returns
an instance) and the OpenAPI document publishes. From it :func:`spec_of` derives the
:mod:`gateway.validation` spec, which keeps the answer to a bad body exactly as it was: one
422 naming every bad field, with the same messages, and the same JSON Schema text.

Decoding takes one of two paths. A body whose fields msgspec checks exactly as the
validator does (integers, booleans, choices: :func:`exact`) is decoded and checked by
msgspec in one pass from the raw bytes; only a body it refuses goes through the validator,
which then names every bad field (or accepts what msgspec is stricter about, such as
``3.0`` for an integer). Any other body goes through the validator first (it strips
strings and refuses NUL and blanks) and its cleaned values become the Struct.

A route's path parameters are a :class:`PathParams` Struct (``Route.params``), one field
per textual placeholder: :func:`path_spec_of` gives the document its parameter schemas and
:func:`read_path` checks each value against the same spec, a bad one answering 404. A
numeric id needs no declaration: it is a :data:`PathId`, read with
:func:`gateway.validation.path_int`.

A response's ``data`` is described by an :class:`Answer` Struct (or ``list[...]`` of one, a
union of tagged ones, or :data:`NO_DATA` for null) given as ``Route.answer``;
:func:`response_components` turns them into the document's schemas, and
``tests/test_openapi.py`` holds that every route answering JSON has one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import date, datetime
from functools import cache
from typing import Annotated, Any, ClassVar, Final, TypeVar

import msgspec
from aiohttp import web
from msgspec import UNSET, UnsetType
from msgspec import inspect as mi

from gateway.http import parse_json, read_raw
from gateway.validation import (
    INT64_MAX,
    INT64_MIN,
    Alt,
    DateOrDatetime,
    F,
    Obj,
    path_text,
    validate,
    validate_query,
)


class Body(msgspec.Struct, forbid_unknown_fields=True):
    """Base of a request body: an unknown field is an error (a typo is not ignored).

    ``alternatives``: when given, the body must match one of them (see
    :class:`gateway.validation.Alt`); the document states them as ``anyOf``.
    """

    alternatives: ClassVar[tuple[Alt, ...]] = ()


class Query(msgspec.Struct, kw_only=True):
    """Base of a query string: its fields are the parameters (others are ignored), each
    optional or with a default. A name Python reserves is spelled ``from_: ... =
    msgspec.field(name="from")``. :func:`read_query` returns an instance."""


class Answer(msgspec.Struct):
    """Base of a response's ``data``: fields beyond those listed may be added later.

    A field typed ``X | None`` is always there, maybe null; a field that is there only
    sometimes is ``X | UnsetType = UNSET`` (not required)."""


class PathParams(msgspec.Struct):
    """Base of a route's textual path parameters: a field per placeholder of the path (each
    a constrained ``str``; the others are numeric ids, :data:`PathId`). A value a field
    refuses names nothing: :func:`read_path` answers 404 "``what`` not found"."""

    what: ClassVar[str]


# A numeric path id, the type of every placeholder a route's PathParams does not declare:
# a row of a BIGINT primary key (gateway.validation.path_int reads it).
PathId = Annotated[int, msgspec.Meta(ge=1, le=INT64_MAX)]
# A textual path parameter (an order id, a plan's name): 1-64 characters, not blank, no NUL.
PathText = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]

# The answer of a route whose envelope carries no data (``"data": null``).
NO_DATA: Final = type(None)


B = TypeVar("B", bound=Body)
P = TypeVar("P", bound=PathParams)
Q = TypeVar("Q", bound=Query)
T = TypeVar("T")


def one_of(choices: Iterable[str]) -> msgspec.Meta:
    """``Annotated[str, one_of(NAMES)]``: the value is one of ``NAMES`` (an enum in the
    document, of a body or an answer), for choices a module declares as a tuple rather
    than a Literal."""
    names = tuple(choices)
    return msgspec.Meta(extra={"choices": names}, extra_json_schema={"enum": list(names)})


# A datetime (with offset) or a bare date, as the validator parses it (query bounds; see
# gateway.validation.date_bound). msgspec unions hold one string-like type at most, so the
# field is typed by this marker and holds whichever the validator made.
DateOrDate = Annotated[Any, msgspec.Meta(extra={"date_or_datetime": True})]
# The bounds of a list by creation time (``from_`` spelled ``from`` on the wire).
CreatedFrom = Annotated[
    DateOrDate,
    msgspec.Meta(description="created at or after (RFC 3339 datetime with offset, or a UTC date)"),
]
CreatedTo = Annotated[
    DateOrDate, msgspec.Meta(description="created before (datetime), or on or before (date)")
]

REF: Final = "#/components/schemas/{name}"


def _number_bounds(t: mi.IntType | mi.FloatType) -> tuple[float | None, float | None]:
    lo = t.ge if t.gt is None else t.gt + (1 if isinstance(t, mi.IntType) else 0)
    hi = t.le if t.lt is None else t.lt - (1 if isinstance(t, mi.IntType) else 0)
    return lo, hi


def _spec(t: mi.Type, **kw: Any) -> F:
    """The validator's spec for one msgspec type (``kw``: required, default, doc...)."""
    if isinstance(t, mi.Metadata):
        doc = (t.extra_json_schema or {}).get("description")
        choices = (t.extra or {}).get("choices")
        if (t.extra or {}).get("date_or_datetime"):
            return F(DateOrDatetime, doc=doc, **kw) if doc else F(DateOrDatetime, **kw)
        if doc:
            kw["doc"] = doc
        if choices:
            kw["choices"] = choices
        return _spec(t.type, **kw)
    if isinstance(t, mi.UnionType):
        others = [u for u in t.types if not isinstance(u, mi.NoneType)]
        if len(others) < len(t.types):
            kw["nullable"] = True
        if len(others) != 1:
            raise TypeError(f"only 'X | None' unions are supported here, not {t}")
        return _spec(others[0], **kw)
    if isinstance(t, mi.IntType):
        lo, hi = _number_bounds(t)
        # the validator keeps every integer within BIGINT anyway, and words its own message
        lo = None if lo == INT64_MIN else lo
        hi = None if hi == INT64_MAX else hi
        return F(int, min=lo, max=hi, **kw)
    if isinstance(t, mi.FloatType):
        lo, hi = _number_bounds(t)
        return F(float, min=lo, max=hi, **kw)
    if isinstance(t, mi.BoolType):
        return F(bool, **kw)
    if isinstance(t, mi.StrType):
        return F(str, min_len=t.min_length, max_len=t.max_length, pattern=t.pattern, **kw)
    if isinstance(t, mi.DateTimeType):
        return F(datetime, **kw)
    if isinstance(t, mi.LiteralType):
        return F(type(t.values[0]), choices=tuple(t.values), **kw)
    if isinstance(t, mi.ListType):
        return F(list, items=_items(t.item_type), min_len=t.min_length, max_len=t.max_length, **kw)
    if isinstance(t, mi.DictType):
        values = None if isinstance(t.value_type, mi.AnyType) else _one_of(t.value_type)
        return F(dict, values=values, min_len=t.min_length, max_len=t.max_length, **kw)
    if isinstance(t, mi.StructType):
        return F(dict, fields=spec_of(t.cls) if issubclass(t.cls, Body) else _fields(t), **kw)
    raise TypeError(f"no validation spec for {t}")


def _one_of(t: mi.Type) -> tuple[F, ...]:
    """The specs of a union's members (``int | str``): a value must match one of them."""
    return tuple(_spec(u) for u in t.types) if isinstance(t, mi.UnionType) else (_spec(t),)


def _items(t: mi.Type) -> type | F | tuple[F, ...]:
    """A list's items: a union is alternatives; a bare ``int`` is checked by its kind alone
    (one message for the list, as a list of ids always had)."""
    if isinstance(t, mi.UnionType) and not any(isinstance(u, mi.NoneType) for u in t.types):
        return _one_of(t)
    if type(t) is mi.IntType and t == mi.IntType():
        return int
    return _spec(t)


def _fields(t: mi.StructType) -> dict[str, F]:
    out = {}
    for f in t.fields:
        kw: dict[str, Any] = {"required": f.required}
        if f.default_factory is not msgspec.NODEFAULT:
            kw["default"] = f.default_factory()
        elif f.default is not msgspec.NODEFAULT and f.default is not None:
            kw["default"] = f.default
        out[f.encode_name] = _spec(f.type, **kw)
    return out


@cache
def spec_of(shape: type[Body]) -> Obj:
    """The :mod:`gateway.validation` spec of ``shape`` (its 422s and its JSON Schema)."""
    info = _info(shape)
    return Obj(_fields(info), alts=shape.alternatives, allow_extra=not info.forbid_unknown_fields)


@cache
def query_spec_of(shape: type[Query]) -> Mapping[str, F]:
    """The :func:`gateway.validation.validate_query` spec of ``shape`` (and its parameters
    in the document). A query string carries no null: ``X | None = None`` is optional."""
    return {name: replace(f, nullable=False) for name, f in _fields(_info(shape)).items()}


@cache
def path_spec_of(shape: type[PathParams]) -> Mapping[str, F]:
    """The spec of each path parameter ``shape`` declares (its check and its schema)."""
    specs = _fields(_info(shape))
    for name, spec in specs.items():
        if spec.kind is not str:  # a numeric id is undeclared: path_int reads it
            raise TypeError(f"{shape.__name__}.{name}: a declared path parameter is a str")
    return specs


# The spec of a path parameter no PathParams declares.
PATH_ID_SPEC: Final = _spec(mi.type_info(PathId))


def _exact_type(t: mi.Type) -> bool:
    if isinstance(t, mi.Metadata):
        return _exact_type(t.type)
    if isinstance(t, mi.UnionType):
        return all(_exact_type(u) for u in t.types)
    if isinstance(t, mi.IntType):  # msgspec takes any 64-bit integer, signed or not
        lo, hi = _number_bounds(t)
        return lo is not None and hi is not None and lo >= INT64_MIN and hi <= INT64_MAX
    return isinstance(t, mi.BoolType | mi.NoneType | mi.LiteralType)


@cache
def exact(shape: type[Body]) -> bool:
    """True when msgspec accepts no body of ``shape`` that the validator refuses, and hands
    over the very values it would: integers with both bounds, booleans, choices, null. Not
    a shape with alternatives, nor one that takes unknown fields: msgspec checks neither."""
    if shape.alternatives or not _info(shape).forbid_unknown_fields:
        return False
    return all(_exact_type(f.type) for f in _info(shape).fields)


# shape -> its decoder when msgspec checks it exactly (see exact), else None
_FAST: Final[dict[type[Body], msgspec.json.Decoder[Any] | None]] = {}


def _build(t: mi.Type, value: Any) -> Any:
    """The validator's cleaned ``value`` as type ``t``, built without checking it again (a
    stripped string may be shorter than its minimum: the validator measured it before)."""
    if value is None:
        return None
    if isinstance(t, mi.Metadata):
        return _build(t.type, value)
    if isinstance(t, mi.UnionType):
        inner = [u for u in t.types if not isinstance(u, mi.NoneType)]
        return _build(inner[0], value) if len(inner) == 1 else value
    if isinstance(t, mi.StructType):
        return t.cls(
            **{
                f.name: _build(f.type, value[f.encode_name])
                for f in t.fields
                if f.encode_name in value
            }
        )
    if isinstance(t, mi.ListType):
        return [_build(t.item_type, v) for v in value]
    return value


@cache
def _info(shape: type[msgspec.Struct]) -> mi.StructType:
    info = mi.type_info(shape)
    assert isinstance(info, mi.StructType)
    return info


def _slow(raw: bytes, shape: type[B]) -> B:
    out: B = _build(_info(shape), validate(parse_json(raw), spec_of(shape)))
    return out


def decode_body(raw: bytes, shape: type[B]) -> B:
    """``raw`` as a ``shape``: 400 INVALID_JSON, or one 422 naming every bad field."""
    if shape not in _FAST:
        _FAST[shape] = msgspec.json.Decoder(shape) if exact(shape) else None
    decoder = _FAST[shape]
    if decoder is not None:
        try:
            out: B = decoder.decode(raw)
        except msgspec.DecodeError:  # ValidationError too: the validator names every field
            return _slow(raw, shape)
        return out
    return _slow(raw, shape)


async def read_body(request: web.Request, shape: type[B]) -> B:
    """The request's JSON body as a ``shape`` (see :func:`decode_body`); 413 if too large."""
    return decode_body(await read_raw(request), shape)


async def read_optional_body(request: web.Request, shape: type[B]) -> B:
    """As :func:`read_body`, but no body at all is ``{}`` (a shape whose fields are optional)."""
    if not request.body_exists:
        return decode_body(b"{}", shape)
    return await read_body(request, shape)


def or_none(value: T | UnsetType) -> T | None:
    """A field the client left out (``UNSET``: it may not send null) as None."""
    return None if value is UNSET else value


def read_query(request: web.Request, shape: type[Q]) -> Q:
    """The request's query string as a ``shape``: one 422 naming every bad parameter."""
    out: Q = _build(_info(shape), validate_query(request.query, query_spec_of(shape)))
    return out


def read_path(request: web.Request, shape: type[P]) -> P:
    """The request's path parameters as a ``shape`` (its route's ``params``, so the document
    states what is checked), each value as sent; one ``shape`` refuses is a 404."""
    info = request.match_info
    values = {
        name: path_text(info[name], shape.what, spec=spec)
        for name, spec in path_spec_of(shape).items()
    }
    out: P = _build(_info(shape), values)
    return out


def as_dict(body: msgspec.Struct) -> dict[str, Any]:
    """The fields of ``body`` that were given or have a default, by their wire names (nested
    bodies too), for the domain functions that take a mapping."""
    out: dict[str, Any] = msgspec.to_builtins(body, builtin_types=(datetime, date))
    return out


def response_components(answers: Iterable[Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The JSON Schema of each answer type (refs into ``components/schemas``) and those
    components."""
    refs, components = msgspec.json.schema_components(list(answers), ref_template=REF)
    return list(refs), components
