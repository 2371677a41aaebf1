"""Typed request bodies (gateway/shapes.py): the same answers as the validator they replace."""

from __future__ import annotations

from typing import Annotated

import msgspec
import pytest

from flashsale.errors import InvalidJSON, ValidationFailed
from gateway.routes.flashsales import JoinBody
from gateway.shapes import Body, decode_body, exact, one_of, spec_of
from gateway.validation import Alt, object_schema

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
