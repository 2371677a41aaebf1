"""The money side of ``flashsale reconcile``: what was paid, refunded and shipped must add up.

Each check is one query that lists the orders breaking one rule:

- ``paid_without_payment``: an order past payment (paid, shipped, delivered, completed,
  refunded) has a verified payment (pay order ``success``) of its amount;
- ``refunds_exceed_paid``: the refunds of a pay order never exceed what it took, and an
  order's ``refunded_cents`` never exceeds its price;
- ``shipped_below_price``: a shipped, delivered or completed order has had nothing given
  back but what its returns refunded (else goods left paid below their price);
- ``cancelled_payment_kept``: every verified payment of a cancelled order went back in full;
- ``return_refund_mismatch``: a refunded return's refund is what its lines are worth (or what
  was asked, if less; or what the approver set explicitly), never more than was left paid.

A finding is printed with the first order ids, counted in the
``flashsale_reconcile_money_drift{check}`` gauge, and, for an order of a flash sale, counted
in that sale's dashboard tile (``rediskeys.dash_money_drift``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Final

import asyncpg
from redis.asyncio import Redis

from flashsale.stores import rediskeys
from flashsale.stores.metrics import get_metrics
from flashsale.timing import DRIFT_KEPT_S

PAID_STATUSES: Final = ("paid", "shipped", "delivered", "completed", "refunded")
PRESALE_PAID_STATUSES: Final = ("paid", "shipped", "completed")

SQL_PAID_WITHOUT_PAYMENT = """
SELECT o.id, o.flash_sale_id FROM orders o
WHERE o.status = ANY($1::text[])
  AND NOT EXISTS (SELECT 1 FROM pay_orders p
                  WHERE p.order_id = o.id AND p.status = 'success'
                    AND p.amount_cents = o.pay_cents)
UNION ALL
SELECT o.id, NULL FROM presale_orders o
WHERE o.status = ANY($2::text[])
  AND NOT EXISTS (SELECT 1 FROM pay_orders p
                  WHERE p.presale_order_id = o.id AND p.status = 'success'
                    AND p.amount_cents = o.total_cents)
"""
SQL_REFUNDS_EXCEED_PAID = """
SELECT coalesce(p.order_id, p.presale_order_id) AS id, o.flash_sale_id
FROM pay_orders p
JOIN (SELECT pay_order_id, sum(amount_cents) AS refunded FROM refunds GROUP BY 1) f
  ON f.pay_order_id = p.id
LEFT JOIN orders o ON o.id = p.order_id
WHERE f.refunded > p.amount_cents
UNION
SELECT o.id, o.flash_sale_id FROM orders o WHERE o.refunded_cents > o.pay_cents
"""
SQL_SHIPPED_BELOW_PRICE = """
SELECT o.id, o.flash_sale_id FROM orders o
WHERE o.status IN ('shipped', 'delivered', 'completed')
  AND o.refunded_cents > 0  -- most orders: no return to add up
  AND o.refunded_cents > (SELECT coalesce(sum(f.amount_cents), 0)
                          FROM order_returns r JOIN refunds f ON f.id = r.refund_id
                          WHERE r.order_id = o.id)
"""
SQL_CANCELLED_PAYMENT_KEPT = """
SELECT coalesce(p.order_id, p.presale_order_id) AS id, o.flash_sale_id
FROM pay_orders p
LEFT JOIN orders o ON o.id = p.order_id
LEFT JOIN presale_orders po ON po.id = p.presale_order_id
WHERE p.status IN ('success', 'refunded')
  AND coalesce(o.status, po.status) = 'cancelled'
  AND (SELECT coalesce(sum(f.amount_cents), 0) FROM refunds f WHERE f.pay_order_id = p.id)
      < p.amount_cents
"""
# What a refunded return should have refunded: the explicit approval, else what was asked
# capped by what its lines are worth (a money-only refund has no lines), capped by what was
# left paid when it was refunded (the refunds of the order made before it).
SQL_RETURN_REFUND_MISMATCH = """
SELECT r.order_id AS id, o.flash_sale_id
FROM order_returns r
JOIN refunds f ON f.id = r.refund_id
JOIN orders o ON o.id = r.order_id
WHERE r.status = 'refunded'
  AND f.amount_cents <> coalesce(
        r.approved_cents,
        least(
            CASE WHEN r.kind = 'return'
                 THEN least(r.amount_cents, return_share_cents(r.order_id, r.items))
                 ELSE r.amount_cents END,
            o.pay_cents - (SELECT coalesce(sum(e.amount_cents), 0) FROM refunds e
                           WHERE e.pay_order_id = f.pay_order_id
                             AND e.created_at < f.created_at)))
"""
CHECKS: Final = {
    "paid_without_payment": (
        SQL_PAID_WITHOUT_PAYMENT,
        (list(PAID_STATUSES), list(PRESALE_PAID_STATUSES)),
    ),
    "refunds_exceed_paid": (SQL_REFUNDS_EXCEED_PAID, ()),
    "shipped_below_price": (SQL_SHIPPED_BELOW_PRICE, ()),
    "cancelled_payment_kept": (SQL_CANCELLED_PAYMENT_KEPT, ()),
    "return_refund_mismatch": (SQL_RETURN_REFUND_MISMATCH, ()),
}
SHOWN: Final = 20  # order ids printed per check


@dataclass
class MoneyReport:
    """The orders each check found (order id → its flash sale, or None)."""

    findings: dict[str, dict[str, int | None]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(self.findings.values())

    def by_sale(self) -> Counter[int]:
        """Findings per flash sale (an order counted once per check it breaks)."""
        return Counter(sale for found in self.findings.values() for sale in found.values() if sale)

    def lines(self) -> list[str]:
        out = []
        for check, found in self.findings.items():
            if not found:
                out.append(f"money {check}: OK")
                continue
            ids = sorted(found)
            more = f" (+{len(ids) - SHOWN} more)" if len(ids) > SHOWN else ""
            out.append(f"money {check}: DRIFT {len(ids)} order(s): {' '.join(ids[:SHOWN])}{more}")
        return out


async def check_money(
    db: asyncpg.Pool, redis: Redis | None = None, sale_ids: list[int] | None = None
) -> MoneyReport:
    """Run every money check; set the drift gauge and, with ``redis``, each of ``sale_ids``'
    dashboard figure (0 when the sale's orders break nothing)."""
    report = MoneyReport()
    metrics = get_metrics()
    async with db.acquire() as conn:
        for check, (sql, args) in CHECKS.items():
            rows = await conn.fetch(sql, *args)
            report.findings[check] = {r["id"]: r["flash_sale_id"] for r in rows}
            metrics.money_drift.labels(check).set(len(rows))
    if redis is not None and sale_ids:
        per_sale = report.by_sale()
        for sid in sale_ids:  # one key per sale's slot (reconcile is no hot path)
            await redis.set(rediskeys.dash_money_drift(sid), per_sale.get(sid, 0), ex=DRIFT_KEPT_S)
    return report
