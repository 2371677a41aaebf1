"""The address book, and the one address schema orders, checkout and the book share."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any, Final

from aiohttp import web
from msgspec import UNSET, Meta, UnsetType

from flashsale import addresses
from flashsale.auth import Principal
from flashsale.errors import AddressBookFull, AddressNotFound
from gateway import appkeys
from gateway.http import ok
from gateway.routing import Route
from gateway.shapes import NO_DATA, Answer, Body, as_dict, read_body
from gateway.validation import Alt, path_int

# Printable text that is not blank: no control characters (C0 and DEL) anywhere.
TEXT_PATTERN: Final = r"[^\x00-\x1f\x7f]*[^\x00-\x20\x7f][^\x00-\x1f\x7f]*"
PHONE_PATTERN: Final = r"\+?[0-9][0-9 ()-]{2,31}"
POSTCODE_PATTERN: Final = r"[0-9A-Za-z][0-9A-Za-z -]{1,11}"


Name = Annotated[
    str, Meta(min_length=1, max_length=64, pattern=TEXT_PATTERN, description="the recipient")
]
Phone = Annotated[
    str,
    Meta(max_length=32, pattern=PHONE_PATTERN, description="digits, spaces, ( ) -, leading +"),
]
Region = Annotated[
    str, Meta(min_length=1, max_length=64, pattern=TEXT_PATTERN, description="province / state")
]
City = Annotated[str, Meta(min_length=1, max_length=64, pattern=TEXT_PATTERN)]
Detail = Annotated[
    str,
    Meta(min_length=1, max_length=200, pattern=TEXT_PATTERN, description="street, building, door"),
]
OneLine = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=500,
        pattern=TEXT_PATTERN,
        description="the whole address on one line",
    ),
]
_STRUCTURED: Final = Alt(("region", "city", "detail"), absent=("address",))


class _Parts(Body):
    name: Name
    phone: Phone
    region: Region | UnsetType = UNSET
    city: City | UnsetType = UNSET
    detail: Detail | UnsetType = UNSET
    postcode: Annotated[str, Meta(pattern=POSTCODE_PATTERN)] | UnsetType | None = UNSET


class Entry(_Parts):
    """An address book entry: always the structured form."""

    is_default: (
        Annotated[bool, Meta(description="make this the default (the first one is)")]
        | UnsetType
        | None
    ) = UNSET
    alternatives = (_STRUCTURED,)


class Address(_Parts):
    """An address given with an order: the same fields, or seed 000's one-line ``address``."""

    address: OneLine | UnsetType = UNSET
    alternatives = (_STRUCTURED, Alt(("address",), absent=("region", "city", "detail")))


AddressId = Annotated[int, Meta(ge=1, description="an entry of the caller's address book")]
# The two ways an order names where it goes (POST /orders, checkout): exactly one of them.
ADDRESS_ALTS: Final = (
    Alt(("shipping_address",), absent=("address_id",)),
    Alt(("address_id",), absent=("shipping_address",)),
)


async def order_address(
    request: web.Request, user_id: int, address_id: int | UnsetType, inline: Address | None
) -> dict[str, Any]:
    """The snapshot an order keeps: of the caller's book entry ``address_id`` (404
    ADDRESS_NOT_FOUND if it is not theirs), or of the ``inline`` shipping address."""
    if address_id is UNSET:
        assert inline is not None  # the body's alternatives: one or the other
        return addresses.snapshot(as_dict(inline))
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
    body = await read_body(request, Entry)
    entry = await addresses.create_address(request.app[appkeys.DB], user_id, as_dict(body))
    return ok(entry, status=201, message="address added")


async def update(request: web.Request, principal: Principal) -> web.Response:
    user_id = principal.user_id
    address_id = _address_id(request)
    body = as_dict(await read_body(request, Entry))
    entry = await addresses.update_address(request.app[appkeys.DB], user_id, address_id, body)
    return ok(entry, message="address updated")


async def delete(request: web.Request, principal: Principal) -> web.Response:
    user_id = principal.user_id
    await addresses.delete_address(request.app[appkeys.DB], user_id, _address_id(request))
    return ok(None, message="address deleted")


class BookEntry(Answer):
    """An entry of the address book (``address``: its parts on one line)."""

    address_id: int
    name: str
    phone: str
    region: str
    city: str
    detail: str
    postcode: str | None
    address: str
    is_default: bool
    created_at: str
    updated_at: str


route = partial(Route, auth="user", tag="addresses")
_NOT_FOUND = (AddressNotFound,)
ROUTES = [
    route(
        "GET",
        "/api/v1/addresses",
        list_,
        "The caller's address book (the default first)",
        answer=list[BookEntry],
    ),
    route(
        "POST",
        "/api/v1/addresses",
        create,
        "Add an address; the first one, or one sent with is_default, is the default",
        body=Entry,
        success={201: "added"},
        responses=(AddressBookFull,),
        answer=BookEntry,
    ),
    route(
        "GET",
        "/api/v1/addresses/{address_id}",
        get,
        "One address of the caller's book",
        responses=_NOT_FOUND,
        answer=BookEntry,
    ),
    route(
        "PUT",
        "/api/v1/addresses/{address_id}",
        update,
        "Replace an address (orders keep their own copy); is_default moves the default",
        body=Entry,
        responses=_NOT_FOUND,
        answer=BookEntry,
    ),
    route(
        "DELETE",
        "/api/v1/addresses/{address_id}",
        delete,
        "Delete an address; if it was the default, the newest other one becomes it",
        responses=_NOT_FOUND,
        answer=NO_DATA,
    ),
]
