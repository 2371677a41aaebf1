"""Decode + validate of the join body, the figures in docs/api.md ("Request bodies").

    .venv/bin/python -m tests.bench_join_body

Compares the hand-written fast path the join had (orjson, then the validator unless the
body is exactly ``{"quantity": <int>}``), the generic validator, the msgspec Struct the join
now reads (``gateway.shapes.decode_body``) and, when pydantic is installed
(``pip install pydantic``; not a dependency), a pydantic v2 model of the same body.
Each figure is the best of 7 runs of 200,000 calls.
"""

from __future__ import annotations

import functools
import importlib
import timeit
from collections.abc import Callable
from typing import Annotated, Any

import orjson

from flashsale.flash.join import MAX_JOIN_QUANTITY
from gateway.routes.flashsales import JoinBody
from gateway.shapes import decode_body, spec_of
from gateway.validation import INT64_MAX, validate

BODIES = (b'{"quantity": 1}', b'{"quantity": 2, "address_id": 12345}')
JOIN = spec_of(JoinBody)


def hand_written(raw: bytes) -> Any:
    body: Any = orjson.loads(raw)
    if type(body) is dict and len(body) == 1 and type(body.get("quantity")) is int:
        if not 1 <= body["quantity"] <= MAX_JOIN_QUANTITY:
            validate(body, JOIN)
        return body["quantity"], None
    checked = validate(body, JOIN)
    return checked["quantity"], checked.get("address_id")


def generic(raw: bytes) -> Any:
    return validate(orjson.loads(raw), JOIN)


def struct(raw: bytes) -> Any:
    return decode_body(raw, JoinBody)


def pydantic_model() -> Callable[[bytes], Any] | None:
    try:
        pydantic = importlib.import_module("pydantic")
    except ImportError:
        return None
    model = pydantic.create_model(
        "JoinModel",
        __config__=pydantic.ConfigDict(extra="forbid", strict=True),
        quantity=(Annotated[int, pydantic.Field(ge=1, le=MAX_JOIN_QUANTITY)], ...),
        address_id=(Annotated[int, pydantic.Field(ge=1, le=INT64_MAX)] | None, None),
    )
    validate_json: Callable[[bytes], Any] = model.model_validate_json
    return validate_json


def main() -> None:
    candidates: list[tuple[str, Callable[[bytes], Any] | None]] = [
        ("hand-written fast path", hand_written),
        ("generic validator", generic),
        ("msgspec Struct", struct),
        ("pydantic v2 model", pydantic_model()),
    ]
    for raw in BODIES:
        for name, fn in candidates:
            if fn is None:
                print(f"{raw.decode():40} {name:24} (not installed)")
                continue
            n = 200_000
            best = min(timeit.repeat(functools.partial(fn, raw), number=n, repeat=7)) / n
            print(f"{raw.decode():40} {name:24} {best * 1e9:6.0f} ns")


if __name__ == "__main__":
    main()
