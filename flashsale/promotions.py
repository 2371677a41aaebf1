"""Tiered amount-off promotions ("满300减50, 满500减100").

Combination rule: a promotion applies at most one tier, the highest tier whose
``min_amount`` the subtotal of the items in its scope reaches. An item benefits
from at most one promotion, so two promotions whose matched items overlap conflict;
among the applicable promotions the pairwise non-conflicting set with the largest
total discount wins (ties: fewer promotions, then lower ids). The search is
exhaustive over at most ``MAX_EXACT_PROMOTIONS`` candidates, greedy beyond.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import combinations
from typing import Any, Final

import asyncpg

from flashsale.stores.db import Conn

MAX_EXACT_PROMOTIONS: Final = 12

# A connection, or the pool's proxy of one (the stubs do not relate the two).

SQL_CATEGORY_CLOSURE = """
WITH RECURSIVE tree AS (
    SELECT id FROM categories WHERE id = ANY($1::bigint[])
    UNION
    SELECT c.id FROM categories c JOIN tree t ON c.parent_id = t.id
)
SELECT id FROM tree
"""
SQL_CATEGORY_IDS_BY_NAME = "SELECT id, name FROM categories WHERE name = ANY($1::text[])"
SQL_CATEGORY_NAMES = "SELECT id, name FROM categories WHERE id = ANY($1::bigint[])"
SQL_INSERT_PROMOTION = """
INSERT INTO promotions (name, rules, category_ids, starts_at, ends_at)
VALUES ($1, $2, $3, $4, $5)
RETURNING id, name, rules, category_ids, starts_at, ends_at
"""
SQL_ACTIVE_PROMOTIONS = """
SELECT id, name, rules, category_ids, starts_at, ends_at FROM promotions
WHERE starts_at <= $1 AND ends_at > $1
ORDER BY id
"""
SQL_PRODUCT_CATEGORIES = "SELECT id, category_id FROM products WHERE id = ANY($1::bigint[])"


@dataclass(frozen=True, slots=True)
class Tier:
    min_amount_cents: int
    discount_cents: int

    @property
    def label(self) -> str:
        return f"满{_yuan(self.min_amount_cents)}减{_yuan(self.discount_cents)}"


@dataclass(frozen=True, slots=True)
class Promotion:
    id: int
    name: str
    tiers: tuple[Tier, ...]
    # every category the promotion covers, descendants included; None = all categories
    category_closure: frozenset[int] | None


@dataclass(frozen=True, slots=True)
class CalcItem:
    """One line to price: ``key`` identifies it (its index) for conflict detection."""

    key: int
    category_id: int | None
    amount_cents: int


@dataclass(frozen=True, slots=True)
class AppliedPromotion:
    promotion_id: int
    discount_cents: int
    tier: Tier
    item_keys: frozenset[int]

    def public(self) -> dict[str, Any]:
        return {
            "promotion_id": self.promotion_id,
            "discount_amount": self.discount_cents,
            "rule_matched": self.tier.label,
            "rule": {
                "min_amount": self.tier.min_amount_cents,
                "discount_amount": self.tier.discount_cents,
            },
        }


def _yuan(cents: int) -> str:
    whole, frac = divmod(cents, 100)
    return str(whole) if frac == 0 else f"{whole}.{frac:02d}"


def best_tier(tiers: Iterable[Tier], amount_cents: int) -> Tier | None:
    """The tier with the highest threshold that ``amount_cents`` reaches."""
    reached = [t for t in tiers if amount_cents >= t.min_amount_cents]
    return max(reached, key=lambda t: (t.min_amount_cents, t.discount_cents), default=None)


def _candidate(promo: Promotion, items: Sequence[CalcItem]) -> AppliedPromotion | None:
    matched = [
        i
        for i in items
        if promo.category_closure is None
        or (i.category_id is not None and i.category_id in promo.category_closure)
    ]
    amount = sum(i.amount_cents for i in matched)
    tier = best_tier(promo.tiers, amount)
    if tier is None:
        return None
    return AppliedPromotion(
        promo.id, min(tier.discount_cents, amount), tier, frozenset(i.key for i in matched)
    )


def best_combination(
    promotions: Sequence[Promotion], items: Sequence[CalcItem]
) -> list[AppliedPromotion]:
    """The non-conflicting set of promotions with the largest total discount."""
    candidates = [c for p in promotions if (c := _candidate(p, items)) is not None]
    candidates.sort(key=lambda c: c.promotion_id)
    if len(candidates) > MAX_EXACT_PROMOTIONS:
        chosen: list[AppliedPromotion] = []
        used: set[int] = set()
        for c in sorted(candidates, key=lambda c: (-c.discount_cents, c.promotion_id)):
            if not (c.item_keys & used):
                chosen.append(c)
                used |= c.item_keys
        return sorted(chosen, key=lambda c: c.promotion_id)
    best: tuple[AppliedPromotion, ...] = ()
    best_total = 0
    for size in range(1, len(candidates) + 1):
        for combo in combinations(candidates, size):
            keys: set[int] = set()
            disjoint = True
            for c in combo:
                if c.item_keys & keys:
                    disjoint = False
                    break
                keys |= c.item_keys
            total = sum(c.discount_cents for c in combo)
            if disjoint and total > best_total:
                best, best_total = combo, total
    return list(best)


async def category_closure(conn: Conn, ids: Sequence[int]) -> frozenset[int]:
    """``ids`` and all their descendant categories."""
    if not ids:
        return frozenset()
    return frozenset(r["id"] for r in await conn.fetch(SQL_CATEGORY_CLOSURE, list(ids)))


async def category_names(conn: Conn, ids: Sequence[int]) -> dict[int, str]:
    if not ids:
        return {}
    return {r["id"]: r["name"] for r in await conn.fetch(SQL_CATEGORY_NAMES, list(ids))}


async def category_ids_by_name(conn: Conn, names: Sequence[str]) -> dict[str, int]:
    """Category name → id (when names repeat, the lowest id)."""
    out: dict[str, int] = {}
    for r in sorted(await conn.fetch(SQL_CATEGORY_IDS_BY_NAME, list(names)), key=lambda r: r["id"]):
        out.setdefault(r["name"], r["id"])
    return out


def _tiers(rules: Any) -> tuple[Tier, ...]:
    return tuple(Tier(int(r["min_amount"]), int(r["discount_amount"])) for r in rules)


async def active_promotions(conn: Conn, now: datetime) -> list[Promotion]:
    rows = await conn.fetch(SQL_ACTIVE_PROMOTIONS, now)
    out = []
    for r in rows:
        closure = await category_closure(conn, r["category_ids"]) if r["category_ids"] else None
        out.append(Promotion(r["id"], r["name"], _tiers(r["rules"]), closure))
    return out


async def list_active(conn: Conn, now: datetime) -> list[dict[str, Any]]:
    """``GET /promotions/amount-off``: the promotions running now."""
    rows = await conn.fetch(SQL_ACTIVE_PROMOTIONS, now)
    names = await category_names(conn, sorted({c for r in rows for c in r["category_ids"]}))
    return [_public(r, names) for r in rows]


def _public(r: asyncpg.Record | dict[str, Any], names: dict[int, str]) -> dict[str, Any]:
    return {
        "promotion_id": r["id"],
        "name": r["name"],
        "rules": sorted(r["rules"], key=lambda t: t["min_amount"]),
        "valid_from": r["starts_at"].isoformat(),
        "valid_until": r["ends_at"].isoformat(),
        "category_ids": list(r["category_ids"]),
        "applicable_categories": [names[c] for c in r["category_ids"] if c in names],
    }


async def create(
    conn: Conn,
    *,
    name: str,
    rules: list[dict[str, int]],
    category_ids: list[int],
    starts_at: datetime,
    ends_at: datetime,
) -> dict[str, Any]:
    row = await conn.fetchrow(SQL_INSERT_PROMOTION, name, rules, category_ids, starts_at, ends_at)
    assert row is not None
    return _public(row, await category_names(conn, category_ids))


async def discount_for(
    conn: Conn, items: Sequence[CalcItem], now: datetime
) -> list[AppliedPromotion]:
    """The best promotions for ``items`` at ``now``."""
    if not items:
        return []
    return best_combination(await active_promotions(conn, now), items)


async def product_categories(conn: Conn, product_ids: Sequence[int]) -> dict[int, int]:
    rows = await conn.fetch(SQL_PRODUCT_CATEGORIES, list(product_ids))
    return {r["id"]: r["category_id"] for r in rows if r["category_id"] is not None}
