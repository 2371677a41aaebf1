"""The address book, and the address snapshot an order keeps.

A user has at most ``MAX_ADDRESSES`` entries and at most one default (a partial unique
index holds it; changes to one user's book are serialized on the user row). An order
never points at an entry: it keeps a snapshot (``orders.shipping_address``), so editing or
deleting an entry later changes no order. The snapshot carries ``name``, ``phone``, the
parts (``region``, ``city``, ``detail``, ``postcode``), the one-line ``address`` every
order view has always shown, and the ``address_id`` it came from (null for an address
typed in at checkout).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final, Protocol

import asyncpg

from flashsale.errors import AddressBookFull, AddressNotFound, NotFound
from flashsale.stores.db import Conn

MAX_ADDRESSES: Final = 50
PARTS: Final = ("name", "phone", "region", "city", "detail", "postcode")

_COLUMNS = (
    "id, user_id, name, phone, region, city, detail, postcode, is_default, created_at, updated_at"
)
SQL_LIST = f"SELECT {_COLUMNS} FROM addresses WHERE user_id = $1 ORDER BY is_default DESC, id DESC"  # noqa: S608
SQL_ONE = f"SELECT {_COLUMNS} FROM addresses WHERE id = $1 AND user_id = $2"  # noqa: S608
SQL_DEFAULT = f"SELECT {_COLUMNS} FROM addresses WHERE user_id = $1 AND is_default"  # noqa: S608
SQL_LOCK_USER = "SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE"
SQL_COUNT = "SELECT count(*) FROM addresses WHERE user_id = $1"
SQL_CLEAR_DEFAULT = """
UPDATE addresses SET is_default = false, updated_at = now()
WHERE user_id = $1 AND is_default AND id <> $2
"""
SQL_INSERT = f"""
INSERT INTO addresses (user_id, name, phone, region, city, detail, postcode, is_default)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
RETURNING {_COLUMNS}
"""  # noqa: S608
SQL_UPDATE = f"""
UPDATE addresses
SET name = $3, phone = $4, region = $5, city = $6, detail = $7, postcode = $8,
    is_default = $9, updated_at = now()
WHERE id = $1 AND user_id = $2
RETURNING {_COLUMNS}
"""  # noqa: S608
SQL_DELETE = "DELETE FROM addresses WHERE id = $1 AND user_id = $2 RETURNING is_default"
SQL_PROMOTE_NEWEST = """
UPDATE addresses SET is_default = true, updated_at = now()
WHERE id = (SELECT id FROM addresses WHERE user_id = $1 ORDER BY id DESC LIMIT 1)
"""
# The flash consumer's batch: the entries named by the joins, and the users' defaults.
SQL_FOR_FLASH = f"""
SELECT {_COLUMNS} FROM addresses
WHERE user_id = ANY($1::bigint[]) AND (is_default OR id = ANY($2::bigint[]))
"""  # noqa: S608


class FlashOrderRef(Protocol):
    """What the consumer knows of a new flash order (an ``OrderEvent`` is one)."""

    @property
    def order_id(self) -> str: ...
    @property
    def user_id(self) -> int: ...
    @property
    def address_id(self) -> int | None: ...


def one_line(parts: Mapping[str, Any]) -> str:
    return " ".join(str(parts[k]) for k in ("region", "city", "detail") if parts.get(k))


def snapshot(parts: Mapping[str, Any], address_id: int | None = None) -> dict[str, Any]:
    """The snapshot an order keeps of an address (a book entry or one typed in); parts
    that were not given are left out."""
    out: dict[str, Any] = {
        "address_id": address_id,
        "name": parts["name"],
        "phone": parts["phone"],
        "region": parts.get("region"),
        "city": parts.get("city"),
        "detail": parts.get("detail"),
        "postcode": parts.get("postcode"),
        "address": parts.get("address") or one_line(parts),
    }
    return {k: v for k, v in out.items() if v is not None}


def _public(r: asyncpg.Record) -> dict[str, Any]:
    return {
        "address_id": r["id"],
        **{k: r[k] for k in PARTS},
        "address": one_line(dict(r)),
        "is_default": r["is_default"],
        "created_at": r["created_at"],
        "updated_at": r["updated_at"],
    }


async def list_addresses(pool: asyncpg.Pool, user_id: int) -> list[dict[str, Any]]:
    return [_public(r) for r in await pool.fetch(SQL_LIST, user_id)]


async def get_address(pool: asyncpg.Pool, user_id: int, address_id: int) -> dict[str, Any]:
    row = await pool.fetchrow(SQL_ONE, address_id, user_id)
    if row is None:
        raise AddressNotFound
    return _public(row)


async def create_address(
    pool: asyncpg.Pool, user_id: int, fields: Mapping[str, Any]
) -> dict[str, Any]:
    """Add an entry; the first one, or one sent with ``is_default``, becomes the default."""
    async with pool.acquire() as conn, conn.transaction():
        if await conn.fetchval(SQL_LOCK_USER, user_id) is None:
            raise NotFound("user not found")
        count = await conn.fetchval(SQL_COUNT, user_id)
        if count >= MAX_ADDRESSES:
            raise AddressBookFull(data={"max": MAX_ADDRESSES})
        make_default = bool(fields.get("is_default")) or count == 0
        if make_default:
            await conn.execute(SQL_CLEAR_DEFAULT, user_id, 0)
        row = await conn.fetchrow(
            SQL_INSERT, user_id, *(fields.get(k) for k in PARTS), make_default
        )
    assert row is not None
    return _public(row)


async def update_address(
    pool: asyncpg.Pool, user_id: int, address_id: int, fields: Mapping[str, Any]
) -> dict[str, Any]:
    """Replace an entry. ``is_default: true`` moves the default here; absent, it stays as it
    was; ``false`` on the default leaves the user without one."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(SQL_LOCK_USER, user_id)
        current = await conn.fetchrow(SQL_ONE, address_id, user_id)
        if current is None:
            raise AddressNotFound
        wanted = fields.get("is_default")
        is_default = current["is_default"] if wanted is None else bool(wanted)
        if is_default:
            await conn.execute(SQL_CLEAR_DEFAULT, user_id, address_id)
        row = await conn.fetchrow(
            SQL_UPDATE, address_id, user_id, *(fields.get(k) for k in PARTS), is_default
        )
    assert row is not None
    return _public(row)


async def delete_address(pool: asyncpg.Pool, user_id: int, address_id: int) -> None:
    """Delete an entry (orders keep their snapshots); deleting the default makes the newest
    remaining entry the default."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(SQL_LOCK_USER, user_id)
        was_default = await conn.fetchval(SQL_DELETE, address_id, user_id)
        if was_default is None:
            raise AddressNotFound
        if was_default:
            await conn.execute(SQL_PROMOTE_NEWEST, user_id)


async def resolve(conn: Conn, user_id: int, address_id: int | None) -> dict[str, Any] | None:
    """The snapshot of the user's entry ``address_id`` (404 if it is not theirs), or of
    their default when ``address_id`` is None (None when they have no default)."""
    if address_id is not None:
        row = await conn.fetchrow(SQL_ONE, address_id, user_id)
        if row is None:
            raise AddressNotFound
    else:
        row = await conn.fetchrow(SQL_DEFAULT, user_id)
        if row is None:
            return None
    return snapshot(dict(row), row["id"])


async def flash_order_addresses(
    conn: Conn, orders: Iterable[FlashOrderRef]
) -> dict[str, dict[str, Any]]:
    """The address of each new flash order, in one query: the entry the join named (when
    it is still the shopper's), else the shopper's default. An order with neither gets its
    address at payment, or the payment is refused (ADDRESS_REQUIRED)."""
    todo = list(orders)
    if not todo:
        return {}
    rows = await conn.fetch(
        SQL_FOR_FLASH,
        sorted({o.user_id for o in todo}),
        sorted({o.address_id for o in todo if o.address_id is not None}),
    )
    by_id = {r["id"]: r for r in rows}
    defaults = {r["user_id"]: r for r in rows if r["is_default"]}
    snaps: dict[int, dict[str, Any]] = {}
    out: dict[str, dict[str, Any]] = {}
    for o in todo:
        named = by_id.get(o.address_id) if o.address_id is not None else None
        row = named if named is not None and named["user_id"] == o.user_id else None
        row = row or defaults.get(o.user_id)
        if row is not None:
            if row["id"] not in snaps:
                snaps[row["id"]] = snapshot(dict(row), row["id"])
            out[o.order_id] = snaps[row["id"]]
    return out
