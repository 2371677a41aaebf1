"""The invariant report after a stampede or a sell-out.

Inputs: the outcome files the load wrote (one line per attempt, tab-separated:
``accepted <order_id>`` or ``rejected <ERROR_CODE>``; Locust writes one file per
process, the benchmark's client one per client process) and PostgreSQL.

    python -m loadtests.invariants [--sale-id 7] [--accepted-file 'out/outcomes.*'] [--wait-s 30]

By default it reads the files the Locust scenarios write (``out/outcomes.<pid>``) and the sale
they name on their first line (``sale <id>``).

prints offered, accepted, rejected by reason, orders in PostgreSQL, oversold, lost
and duplicates, and exits 1 when oversold, lost or duplicates is not 0. For a queued sale
it adds the waiting room's figures (:mod:`loadtests.queue_report`): admitted vs joined vs
accepted, joins without admission (must be 0) and the fairness figures.

Offered, accepted and rejected count the joins in the outcome files: this load's. The
checks count every flash order of the sale in PostgreSQL, this load's and any other
(a join by hand, an earlier run): the report says how many of each.

- **oversold**: live units (orders not cancelled/refunded) beyond the sale's quantity;
- **lost**: accepted order ids that are not in PostgreSQL (after waiting up to
  ``--wait-s`` for the consumers to drain);
- **duplicates**: an order id handed out to two attempts, plus live orders of a user
  beyond the sale's ``per_user_limit``.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from flashsale.settings import Settings
from loadtests import queue_report
from loadtests.scenario_support import DEFAULT_OUTCOMES
from stack import stackfile

SQL_SALE = "SELECT * FROM flash_sales WHERE id = $1"
SQL_SALE_ORDERS = """
SELECT o.id, o.user_id, o.status, COALESCE(sum(i.quantity), 0)::bigint AS quantity
FROM orders o LEFT JOIN order_items i ON i.order_id = o.id
WHERE o.flash_sale_id = $1 AND o.kind = 'flash'
GROUP BY o.id
"""
DEAD_STATUSES = frozenset({"cancelled", "refunded"})


@dataclass(frozen=True, slots=True)
class PersistedOrder:
    order_id: str
    user_id: int
    status: str
    quantity: int


@dataclass
class Outcomes:
    offered: int = 0
    accepted: list[str] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)


@dataclass
class Report:
    offered: int
    accepted: int
    rejected: dict[str, int]
    total_quantity: int | None
    orders_in_pg: int
    orders_other: int
    units_live: int
    oversold: int
    lost: int
    duplicates: int

    @property
    def ok(self) -> bool:
        return self.oversold == 0 and self.lost == 0 and self.duplicates == 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def lines(self) -> list[str]:
        rej = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())) or "none"
        return [
            f"offered        {self.offered}   (joins in the outcome files)",
            f"accepted       {self.accepted}",
            f"rejected       {sum(self.rejected.values())} ({rej})",
            f"sale quantity  {self.total_quantity if self.total_quantity is not None else '?'}",
            f"orders in PG   {self.orders_in_pg} ({self.units_live} live units; "
            f"{self.orders_in_pg - self.orders_other} from the outcome files, "
            f"{self.orders_other} other joins of the sale: by hand, earlier runs)",
            f"oversold       {self.oversold}   (must be 0)",
            f"lost           {self.lost}   (must be 0)",
            f"duplicates     {self.duplicates}   (must be 0)",
        ]


def sale_of(path: Path) -> int | None:
    """The sale an outcome file names on its first line (a scenario's), if it does."""
    with path.open(encoding="utf-8") as f:
        kind, _, value = f.readline().rstrip("\n").partition("\t")
    return int(value) if kind == "sale" and value.isdigit() else None


def read_outcomes(paths: Iterable[Path]) -> Outcomes:
    out = Outcomes()
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            kind, _, value = line.partition("\t")
            if not kind or kind == "sale":
                continue
            out.offered += 1
            if kind == "accepted":
                out.accepted.append(value)
            else:
                out.rejected[value or "UNKNOWN"] += 1
    return out


def summarize(
    outcomes: Outcomes,
    persisted: list[PersistedOrder],
    total_quantity: int | None,
    per_user_limit: int | None = None,
) -> Report:
    """The report from what the load saw and what PostgreSQL holds (pure, for tests)."""
    in_pg = {o.order_id for o in persisted}
    live = [o for o in persisted if o.status not in DEAD_STATUSES]
    units_live = sum(o.quantity for o in live)
    oversold = max(0, units_live - total_quantity) if total_quantity is not None else 0
    distinct_accepted = set(outcomes.accepted)
    lost = len(distinct_accepted - in_pg)
    duplicates = len(outcomes.accepted) - len(distinct_accepted)
    if per_user_limit is not None:
        per_user = Counter(o.user_id for o in live)
        duplicates += sum(max(0, n - per_user_limit) for n in per_user.values())
    return Report(
        offered=outcomes.offered,
        accepted=len(outcomes.accepted),
        rejected=dict(outcomes.rejected),
        total_quantity=total_quantity,
        orders_in_pg=len(persisted),
        orders_other=len(in_pg - distinct_accepted),
        units_live=units_live,
        oversold=oversold,
        lost=lost,
        duplicates=duplicates,
    )


async def fetch_sale(
    conn: asyncpg.Connection, sale_id: int
) -> tuple[int | None, int | None, list[PersistedOrder]]:
    """The sale's quantity, per-user limit and its flash orders in PostgreSQL."""
    sale = await conn.fetchrow(SQL_SALE, sale_id)
    quantity = per_user = None
    if sale is not None:
        quantity = int(sale["quantity"])
        per_user = int(sale["per_user_limit"]) if "per_user_limit" in sale.keys() else None  # noqa: SIM118
    rows = await conn.fetch(SQL_SALE_ORDERS, sale_id)
    orders = [
        PersistedOrder(str(r["id"]), int(r["user_id"]), str(r["status"]), int(r["quantity"]))
        for r in rows
    ]
    return quantity, per_user, orders


async def report(dsn: str, sale_id: int, outcomes: Outcomes, *, wait_s: float = 0.0) -> Report:
    """Fetch and summarize; poll up to ``wait_s`` while accepted orders are still missing."""
    deadline = time.monotonic() + wait_s
    conn = await asyncpg.connect(dsn)
    try:
        while True:
            quantity, per_user, orders = await fetch_sale(conn, sale_id)
            result = summarize(outcomes, orders, quantity, per_user)
            if result.lost == 0 or time.monotonic() >= deadline:
                return result
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


def expand(patterns: list[str]) -> list[Path]:
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern))
        paths.extend(Path(m) for m in (matches or [pattern]))
    return paths


class Unusable(Exception):
    """What to pass instead (one line)."""


def choose_files(patterns: list[str], sale_id: int | None) -> tuple[int, list[Path]]:
    """The sale and its outcome files: those naming ``sale_id`` (and those naming none);
    without ``sale_id``, the one sale the files name."""
    paths = [p for p in expand(patterns) if p.is_file()]
    if not paths:
        raise Unusable(
            f"no outcome file matches {' '.join(patterns)}: run a scenario first (it writes "
            f"{DEFAULT_OUTCOMES}.<pid> unless LOCUST_OUTCOMES says otherwise), or pass "
            "--accepted-file"
        )
    named = {p: sale_of(p) for p in paths}
    if sale_id is None:
        sales = sorted({s for s in named.values() if s is not None})
        if len(sales) != 1:
            which = f"name sales {sales}" if sales else "name no sale"
            raise Unusable(f"the outcome files {which}: pass --sale-id")
        sale_id = sales[0]
    return sale_id, [p for p, s in named.items() if s in (None, sale_id)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="invariant report after a stampede")
    p.add_argument(
        "--sale-id",
        type=int,
        help="the sale (default: the one the outcome files name)",
    )
    p.add_argument(
        "--accepted-file",
        action="append",
        help=f"outcome file(s); repeatable; globs allowed (default: '{DEFAULT_OUTCOMES}.*')",
    )
    p.add_argument(
        "--wait-s",
        type=float,
        default=30.0,
        help="wait this long for accepted orders to reach PostgreSQL",
    )
    args = p.parse_args(argv)
    try:
        sale_id, files = choose_files(args.accepted_file or [f"{DEFAULT_OUTCOMES}.*"], args.sale_id)
    except Unusable as exc:
        print(f"invariants: {exc}", file=sys.stderr)
        return 2
    settings = stackfile.fill(Settings.from_env()).require("database_url")
    outcomes = read_outcomes(files)
    print(f"sale {sale_id}, from {len(files)} outcome file(s)")
    result = asyncio.run(report(settings.database, sale_id, outcomes, wait_s=args.wait_s))
    print("\n".join(result.lines()))
    queue = asyncio.run(queue_report.for_sale(settings.database, settings.redis_url, sale_id))
    if queue is not None:  # a queued sale: admitted vs joined vs accepted, and fairness
        print("\n".join(queue.lines(result.accepted)))
    return 0 if result.ok and (queue is None or queue.ok) else 1


if __name__ == "__main__":
    sys.exit(main())
