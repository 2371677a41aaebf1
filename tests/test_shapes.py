"""Typed request bodies and path parameters (gateway/shapes.py): the same answers as the
validator specs they replace."""

from __future__ import annotations

from typing import Annotated

import msgspec
import pytest
from aiohttp.test_utils import make_mocked_request

from flashsale.errors import InvalidJSON, NotFound, ValidationFailed
from gateway.routes import extra_routes, health, users
from gateway.routes.dashboard import AssetPath
from gateway.routes.flashsales import JoinBody
from gateway.routes.orders import OrderPath
from gateway.routes.payments import SANDBOX_ROUTES
from gateway.routes.presale import PreorderPath
from gateway.routing import openapi_spec, path_params, path_spec
from gateway.shapes import (
    PATH_ID_SPEC,
    Body,
    PathId,
    PathParams,
    decode_body,
    exact,
    one_of,
    path_spec_of,
    read_path,
    spec_of,
)
from gateway.validation import INT64_MAX, Alt, json_schema, object_schema

pytestmark = pytest.mark.unit


def test_join_body_publishes_the_schema_it_had() -> None:
    assert exact(JoinBody)
    assert object_schema(spec_of(JoinBody)) == {
        "type": "object",
        "properties": {
            "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
            "address_id": {
                "type": ["integer", "null"],
                "minimum": 1,
                "maximum": 2**63 - 1,
                "description": "an entry of the caller's address book; default: their default "
                "address (resolved after the join, checked at payment)",
            },
        },
        "required": ["quantity"],
        "additionalProperties": False,
    }


@pytest.mark.parametrize(
    ("raw", "quantity", "address_id"),
    [
        (b'{"quantity": 1}', 1, None),
        (b'{"quantity": 2, "address_id": 7}', 2, 7),
        (b'{"quantity": 3.0, "address_id": null}', 3, None),  # JSON Schema's integer
    ],
)
def test_join_body_accepts(raw: bytes, quantity: int, address_id: int | None) -> None:
    body = decode_body(raw, JoinBody)
    assert (body.quantity, body.address_id) == (quantity, address_id)


def test_every_bad_field_at_once() -> None:
    with pytest.raises(ValidationFailed) as caught:
        decode_body(b'{"quantity": 0, "address_id": true, "qty": 1}', JoinBody)
    assert caught.value.fields == {
        "qty": "unknown field",
        "quantity": "must be >= 1",
        "address_id": "must be integer",
    }
    with pytest.raises(ValidationFailed) as caught:
        decode_body(b'{"address_id": 18446744073709551615}', JoinBody)
    assert caught.value.fields == {
        "quantity": "is required",
        "address_id": "must be <= 9223372036854775807",
    }
    with pytest.raises(ValidationFailed) as caught:
        decode_body(b"[1]", JoinBody)
    assert caught.value.fields == {"body": "must be an object"}
    with pytest.raises(InvalidJSON):
        decode_body(b'{"quantity": ', JoinBody)


class _Note(Body):
    text: Annotated[str, msgspec.Meta(min_length=3, max_length=8)]
    pinned: bool = False
    alternatives = (Alt(("text",)),)


def test_a_body_with_strings_goes_through_the_validator() -> None:
    assert not exact(_Note)  # the validator strips strings and refuses NUL and blanks
    # measured before it is stripped, as it always was
    assert decode_body(b'{"text": "  hi "}', _Note) == _Note(text="hi", pinned=False)
    assert spec_of(_Note).alts == (Alt(("text",)),)
    with pytest.raises(ValidationFailed) as caught:
        decode_body(b'{"text": "   ", "pinned": 1}', _Note)
    assert caught.value.fields == {
        "text": "has an invalid format or is blank",
        "pinned": "must be boolean",
    }


class _Pick(Body, kw_only=True):
    limit: Annotated[int, msgspec.Meta(ge=0, le=9)] | msgspec.UnsetType = msgspec.UNSET
    colour: Annotated[str, one_of(("red", "blue"))]


def test_optional_but_not_null_and_choices_from_a_tuple() -> None:
    spec = spec_of(_Pick)
    assert not spec["limit"].required and not spec["limit"].nullable
    assert spec["colour"].choices == ("red", "blue")
    assert decode_body(b'{"colour": "red"}', _Pick).limit is msgspec.UNSET
    with pytest.raises(ValidationFailed) as caught:
        decode_body(b'{"limit": null, "colour": "green"}', _Pick)
    assert caught.value.fields == {
        "limit": "must not be null",
        "colour": "must be one of: red, blue",
    }


def test_every_path_parameter_comes_from_a_typed_declaration() -> None:
    """A route's textual placeholders are the fields of its PathParams type, the others are
    numeric ids (PathId); the document states the very specs read_path checks, with the
    bounds msgspec reads off the same Struct."""
    routes = [*health.ROUTES, *users.ROUTES, *extra_routes(), *SANDBOX_ROUTES]
    doc = openapi_spec(routes, version="test")
    declared = 0
    for r in routes:
        where = (r.method, r.path)
        names = path_params(r)
        published = {
            p["name"]: p["schema"]
            for p in doc["paths"][r.path][r.method.lower()].get("parameters", [])
            if p["in"] == "path"
        }
        assert list(published) == names, where
        assert published == {n: json_schema(s) for n, s in path_spec(r).items()}, where
        if r.params is None:
            assert all(s is PATH_ID_SPEC for s in path_spec(r).values()), where
            continue
        declared += 1
        assert issubclass(r.params, PathParams) and r.params.what, where
        assert set(r.params.__struct_fields__) <= set(names), (where, "not in the path")
        _, own = msgspec.json.schema_components([r.params])
        for name, field in own[r.params.__name__]["properties"].items():
            for bound in ("minLength", "maxLength"):
                assert published[name].get(bound) == field.get(bound), (where, name, bound)
    assert declared, "no route declares its path parameters"


def test_a_numeric_id_publishes_its_bigint_bounds() -> None:
    assert json_schema(PATH_ID_SPEC) == {"type": "integer", "minimum": 1, "maximum": INT64_MAX}
    assert msgspec.json.schema(PathId) == {"type": "integer", "minimum": 1, "maximum": INT64_MAX}


def _read(shape: type[PathParams], **values: str) -> PathParams:
    return read_path(make_mocked_request("GET", "/", match_info=values), shape)


@pytest.mark.parametrize(
    ("shape", "values", "message"),
    [
        (OrderPath, {"id": "x" * 65}, "order not found"),
        (OrderPath, {"id": " \t"}, "order not found"),
        (OrderPath, {"id": "1\x00"}, "order not found"),
        (PreorderPath, {"order_id": "12a"}, "presale order not found"),
        (PreorderPath, {"order_id": "1" * 41}, "presale order not found"),
        (AssetPath, {"name": ".env"}, "file not found"),
    ],
)
def test_a_path_value_its_type_refuses_is_404(
    shape: type[PathParams], values: dict[str, str], message: str
) -> None:
    with pytest.raises(NotFound) as caught:
        _read(shape, **values)
    assert caught.value.message == message and caught.value.fields is None


def test_a_path_value_comes_back_as_sent() -> None:
    assert _read(OrderPath, id=" 42 ") == OrderPath(id=" 42 ")
    assert _read(PreorderPath, order_id="9" * 40) == PreorderPath(order_id="9" * 40)
    assert _read(AssetPath, name="app.js") == AssetPath(name="app.js")


class _CountPath(PathParams):
    what = "count"
    n: PathId


def test_a_declared_path_parameter_is_text() -> None:
    """A numeric id is left undeclared (path_int reads it): declaring one would 404 always."""
    with pytest.raises(TypeError, match=r"_CountPath\.n"):
        path_spec_of(_CountPath)
