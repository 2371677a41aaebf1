"""The address book, and the one address schema orders, checkout and the book share."""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web

from flashsale import addresses
from flashsale.auth import Principal
from flashsale.errors import AddressBookFull, AddressNotFound
from gateway import appkeys
from gateway.http import ok, read_json
from gateway.routing import Route
from gateway.validation import Alt, F, Obj, path_int, validate

# Printable text that is not blank: no control characters (C0 and DEL) anywhere.
TEXT_PATTERN: Final = r"[^\x00-\x1f\x7f]*[^\x00-\x20\x7f][^\x00-\x1f\x7f]*"
PHONE_PATTERN: Final = r"\+?[0-9][0-9 ()-]{2,31}"
POSTCODE_PATTERN: Final = r"[0-9A-Za-z][0-9A-Za-z -]{1,11}"


def _text(max_len: int, *, required: bool = True, doc: str | None = None) -> F:
    return F(str, required=required, min_len=1, max_len=max_len, pattern=TEXT_PATTERN, doc=doc)


_PARTS: Final = {
    "name": _text(64, doc="the recipient"),
    "phone": F(str, max_len=32, pattern=PHONE_PATTERN, doc="digits, spaces, ( ) -, leading +"),
    "region": _text(64, required=False, doc="province / state"),
    "city": _text(64, required=False),
    "detail": _text(200, required=False, doc="street, building, door"),
    "postcode": F(str, required=False, nullable=True, pattern=POSTCODE_PATTERN),
}
_STRUCTURED: Final = Alt(("region", "city", "detail"), absent=("address",))
# An address book entry: always the structured form.
ENTRY = Obj(
    {
        **_PARTS,
        "is_default": F(
            bool, required=False, nullable=True, doc="make this the default (the first one is)"
        ),
    },
    alts=(_STRUCTURED,),
)
# An address given with an order: the same fields, or seed 000's one-line ``address``.
ADDRESS = Obj(
    {**_PARTS, "address": _text(500, required=False, doc="the whole address on one line")},
    alts=(_STRUCTURED, Alt(("address",), absent=("region", "city", "detail"))),
)
ADDRESS_ID: Final = F(int, required=False, min=1, doc="an entry of the caller's address book")
# The two ways an order names where it goes (POST /orders, checkout): exactly one of them.
ADDRESS_ALTS: Final = (
    Alt(("shipping_address",), absent=("address_id",)),
    Alt(("address_id",), absent=("shipping_address",)),
)


async def order_address(request: web.Request, user_id: int, body: dict[str, Any]) -> dict[str, Any]:
    """The snapshot an order keeps: of the caller's book entry ``address_id`` (404
    ADDRESS_NOT_FOUND if it is not theirs), or of the inline ``shipping_address``."""
    address_id = body.get("address_id")
    if address_id is None:
        return addresses.snapshot(body["shipping_address"])
    async with request.app[appkeys.DB].acquire() as conn:
        found = await addresses.resolve(conn, user_id, address_id)
    assert found is not None  # resolve() raises for an id that is not the caller's
    return found


def _address_id(request: web.Request) -> int:
    return path_int(request.match_info["address_id"], "address")


async def list_(request: web.Request, principal: Principal) -> web.Response:
    return ok(await addresses.list_addresses(request.app[appkeys.DB], principal.user_id))


async def get(request: web.Request, principal: Principal) -> web.Response:
    return ok(
        await addresses.get_address(
            request.app[appkeys.DB], principal.user_id, _address_id(request)
        )
    )


async def create(request: web.Request, principal: Principal) -> web.Response:
    user_id = principal.user_id
    body = validate(await read_json(request), ENTRY)
    entry = await addresses.create_address(request.app[appkeys.DB], user_id, body)
    return ok(entry, status=201, message="address added")


async def update(request: web.Request, principal: Principal) -> web.Response:
    user_id = principal.user_id
    address_id = _address_id(request)
    body = validate(await read_json(request), ENTRY)
    entry = await addresses.update_address(request.app[appkeys.DB], user_id, address_id, body)
    return ok(entry, message="address updated")


async def delete(request: web.Request, principal: Principal) -> web.Response:
    user_id = principal.user_id
    await addresses.delete_address(request.app[appkeys.DB], user_id, _address_id(request))
    return ok(None, message="address deleted")


_NOT_FOUND = (AddressNotFound,)
ROUTES = [
    Route(
        "GET",
        "/api/v1/addresses",
        list_,
        "The caller's address book (the default first)",
        auth="user",
        tag="addresses",
    ),
    Route(
        "POST",
        "/api/v1/addresses",
        create,
        "Add an address; the first one, or one sent with is_default, is the default",
        auth="user",
        body=ENTRY,
        tag="addresses",
        success={201: "added"},
        responses=(AddressBookFull,),
    ),
    Route(
        "GET",
        "/api/v1/addresses/{address_id}",
        get,
        "One address of the caller's book",
        auth="user",
        tag="addresses",
        responses=_NOT_FOUND,
    ),
    Route(
        "PUT",
        "/api/v1/addresses/{address_id}",
        update,
        "Replace an address (orders keep their own copy); is_default moves the default",
        auth="user",
        body=ENTRY,
        tag="addresses",
        responses=_NOT_FOUND,
    ),
    Route(
        "DELETE",
        "/api/v1/addresses/{address_id}",
        delete,
        "Delete an address; if it was the default, the newest other one becomes it",
        auth="user",
        tag="addresses",
        responses=_NOT_FOUND,
    ),
]
