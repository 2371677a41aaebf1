"""``flashsale capacity``: the hardware a sale needs, from the costs the bench measured
(容量规划, seed 002: node capacity = throughput × latency, N + X redundancy).

Reads the JSON ``flashsale bench`` writes (``--from``, default ``bench-results.json``) and,
for ``--peak-joins`` accepted joins per second and ``--storefront-rps`` storefront requests
per second, prints per tier the CPU the load asks for, the units that carry it at the
target utilisation, the same with redundancy (N + max(1, ⌈0.2 N⌉)), the requests in flight
(Little's law), the buckets one hot sale needs, and the first bottleneck.

What it reads from the bench's JSON, by row (``rows[].scenario``) — each one named in the
output with the value read, and a figure it cannot find is said, never invented:

* ``3 accept path (join, 202)``: ``detail.cpu_us.{gateway,redis,kafka}``, CPU µs per
  accepted join of the gateway processes, the valkey thread and the broker; ``p50_ms``,
  ``p99_ms``;
* ``6b one hot sale, 1 consumer(s) (orders/s)``: ``detail.consumer_cpu_s``,
  ``detail.postgres_cpu_s`` over ``detail.events`` orders, CPU µs per persisted order;
* a row whose subject is the storefront (``"<id> storefront …"``), if the bench has one:
  ``detail.cpu_us.{gateway,postgres}`` per storefront request; else
  ``--storefront-gateway-us`` / ``--storefront-postgres-us``.

A per-process figure may be a number or an object (``{"us_per_request": …}`` or
``{"median": …}``), under ``detail.cpu_us_per_request`` or ``detail.cpu_us``: the bench's
accounting is being reworked and either shape is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson

ACCEPT_ROW: Final = "3 accept path"
DRAIN_ROW: Final = "6b one hot sale, 1 consumer"
STOREFRONT_WORD: Final = "storefront"
MAX_BUCKETS: Final = 64  # a sale's buckets (flashsale/flash/buckets.py)
BEGIN: Final = "<!-- flashsale capacity: generated, do not edit by hand -->"
END: Final = "<!-- end of flashsale capacity -->"


class CapacityError(Exception):
    """The bench JSON is missing or lacks what a tier needs."""


@dataclass(frozen=True, slots=True)
class Costs:
    """CPU µs per unit of work, each with where it was read."""

    gateway_per_join: float
    redis_per_join: float
    broker_per_join: float
    consumer_per_order: float
    postgres_per_order: float
    storefront_gateway: float | None = None
    storefront_postgres: float | None = None
    join_p50_ms: float | None = None
    join_p99_ms: float | None = None
    sources: dict[str, str] = field(default_factory=dict)


def _rows(bench: dict[str, Any]) -> list[dict[str, Any]]:
    rows = bench.get("rows")
    if not isinstance(rows, list):
        raise CapacityError("the bench JSON has no 'rows' list (is it flashsale bench's output?)")
    return [r for r in rows if isinstance(r, dict)]


def _row(rows: list[dict[str, Any]], prefix: str) -> dict[str, Any] | None:
    return next((r for r in rows if str(r.get("scenario", "")).startswith(prefix)), None)


def _number(value: Any) -> float | None:
    if isinstance(value, dict):
        for key in ("us_per_request", "per_request", "median", "value"):
            if key in value:
                return _number(value[key])
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None


def _cpu_us(row: dict[str, Any], process: str) -> tuple[float | None, str]:
    detail = row.get("detail") or {}
    for key in ("cpu_us_per_request", "cpu_us"):
        per = detail.get(key)
        if isinstance(per, dict) and process in per:
            value = _number(per[process])
            if value is not None:
                return value, f"{row['scenario']!r} detail.{key}.{process}"
    return None, ""


def read_costs(
    bench: dict[str, Any],
    *,
    storefront_gateway_us: float | None = None,
    storefront_postgres_us: float | None = None,
) -> Costs:
    rows = _rows(bench)
    sources: dict[str, str] = {}
    accept = _row(rows, ACCEPT_ROW)
    if accept is None:
        raise CapacityError(f"no row {ACCEPT_ROW!r}: run flashsale bench (its row 3 prices a join)")
    per_join: dict[str, float] = {}
    for process in ("gateway", "redis", "kafka"):
        value, where = _cpu_us(accept, process)
        if value is None:
            raise CapacityError(
                f"row {accept['scenario']!r} has no CPU µs per request of {process}"
            )
        per_join[process], sources[f"{process} µs per join"] = value, where
    drain = _row(rows, DRAIN_ROW)
    detail = (drain or {}).get("detail") or {}
    events = _number(detail.get("events"))
    if drain is None or not events:
        raise CapacityError(f"no row {DRAIN_ROW!r} with its events: the order side is unpriced")
    per_order: dict[str, float] = {}
    for key, name in (("consumer_cpu_s", "consumer"), ("postgres_cpu_s", "postgres")):
        seconds = _number(detail.get(key))
        if seconds is None:
            raise CapacityError(f"row {drain['scenario']!r} has no detail.{key}")
        per_order[name] = seconds * 1e6 / events
        sources[f"{name} µs per order"] = f"{drain['scenario']!r} detail.{key} / detail.events"
    store_gw, store_pg = storefront_gateway_us, storefront_postgres_us
    # a storefront row names the storefront as its subject ("11 storefront reads"), not a
    # join row that mentions it ("10a join, no storefront load")
    shop = next((r for r in rows if _is_storefront_row(str(r.get("scenario", "")))), None)
    if shop is not None:
        if store_gw is None:
            store_gw, where = _cpu_us(shop, "gateway")
            sources["storefront gateway µs"] = where
        if store_pg is None:
            store_pg, where = _cpu_us(shop, "postgres")
            sources["storefront postgres µs"] = where
    if storefront_gateway_us is not None:
        sources["storefront gateway µs"] = "--storefront-gateway-us"
    if storefront_postgres_us is not None:
        sources["storefront postgres µs"] = "--storefront-postgres-us"
    return Costs(
        gateway_per_join=per_join["gateway"],
        redis_per_join=per_join["redis"],
        broker_per_join=per_join["kafka"],
        consumer_per_order=per_order["consumer"],
        postgres_per_order=per_order["postgres"],
        storefront_gateway=store_gw,
        storefront_postgres=store_pg,
        join_p50_ms=_number(accept.get("p50_ms")),
        join_p99_ms=_number(accept.get("p99_ms")),
        sources=sources,
    )


@dataclass(frozen=True, slots=True)
class Tier:
    name: str
    unit: str
    cores: float  # CPU the load asks for, in cores (core-seconds per second)
    units: int  # units at the target utilisation
    with_redundancy: int
    utilisation: float  # of each unit, at ``units``

    def row(self) -> str:
        return (
            f"| {self.name} | {self.unit} | {self.cores:.2f} | {self.units} | "
            f"{self.with_redundancy} | {self.utilisation:.0%} |"
        )


def redundant(units: int) -> int:
    """N + X with X = ⌈0.2 N⌉ and at least one spare (seed 002: X = 0.2 N for app clusters)."""
    return units + max(1, math.ceil(0.2 * units))


def tier(name: str, unit: str, cores: float, target: float) -> Tier:
    units = max(1, math.ceil(cores / target - 1e-9))
    return Tier(name, unit, cores, units, redundant(units), cores / units)


@dataclass(frozen=True, slots=True)
class Plan:
    peak_joins: float
    storefront_rps: float
    target: float
    tiers: list[Tier]
    hot_sale_buckets: int
    in_flight_joins: float | None
    bottleneck: str
    notes: list[str]


def _is_storefront_row(scenario: str) -> bool:
    words = scenario.split()
    return len(words) > 1 and words[1] == STOREFRONT_WORD


def plan(costs: Costs, *, peak_joins: float, storefront_rps: float, target: float) -> Plan:
    notes = []
    shop_gw = costs.storefront_gateway
    shop_pg = costs.storefront_postgres
    if storefront_rps and (shop_gw is None or shop_pg is None):
        notes.append(
            "storefront not priced: the bench JSON has no storefront row; pass "
            "--storefront-gateway-us and --storefront-postgres-us (the storefront is left out)"
        )
        shop_gw = shop_pg = 0.0
    shop_gw, shop_pg = shop_gw or 0.0, shop_pg or 0.0
    tiers = [
        tier(
            "gateway",
            "core",
            (peak_joins * costs.gateway_per_join + storefront_rps * shop_gw) / 1e6,
            target,
        ),
        tier(
            "Redis", "shard (one primary thread)", peak_joins * costs.redis_per_join / 1e6, target
        ),
        tier("broker", "core", peak_joins * costs.broker_per_join / 1e6, target),
        tier(
            "consumers", "process (one core)", peak_joins * costs.consumer_per_order / 1e6, target
        ),
        tier(
            "PostgreSQL",
            "core",
            (peak_joins * costs.postgres_per_order + storefront_rps * shop_pg) / 1e6,
            target,
        ),
    ]
    # one hot sale takes every join: it needs a bucket on each shard it keeps busy
    buckets = tiers[1].units
    if buckets > MAX_BUCKETS:
        notes.append(
            f"one hot sale would need {buckets} buckets, past a sale's {MAX_BUCKETS}: split "
            "the stock over several sales (or a waiting room: queue-sale)"
        )
    in_flight = None
    if costs.join_p50_ms is not None:
        in_flight = peak_joins * costs.join_p50_ms / 1000  # Little: L = λ W
    worst = max(tiers, key=lambda t: t.utilisation)
    bottleneck = (
        f"one hot sale's {MAX_BUCKETS} buckets"
        if buckets > MAX_BUCKETS
        else f"{worst.name} ({worst.utilisation:.0%} of each {worst.unit} at {worst.units})"
    )
    return Plan(peak_joins, storefront_rps, target, tiers, buckets, in_flight, bottleneck, notes)


def render(p: Plan, costs: Costs, source: str) -> str:
    lines = [
        BEGIN,
        f"## Plan for {p.peak_joins:,.0f} joins/s and {p.storefront_rps:,.0f} storefront "
        f"requests/s (target utilisation {p.target:.0%})",
        "",
        f"Generated by `flashsale capacity` from `{source}`; every unit below is CPU µs of "
        "work per request as the bench measured it on its machine.",
        "",
        "| cost | µs | read from |",
        "|---|---:|---|",
    ]
    figures = {
        "gateway µs per join": costs.gateway_per_join,
        "redis µs per join": costs.redis_per_join,
        "kafka µs per join": costs.broker_per_join,
        "consumer µs per order": costs.consumer_per_order,
        "postgres µs per order": costs.postgres_per_order,
        "storefront gateway µs": costs.storefront_gateway,
        "storefront postgres µs": costs.storefront_postgres,
    }
    for name, value in figures.items():
        shown = "not measured" if value is None else f"{value:.1f}"
        lines.append(f"| {name} | {shown} | {costs.sources.get(name, '—')} |")
    lines += [
        "",
        "| tier | unit | cores asked | units | with redundancy (N + max(1, 0.2 N)) | utilisation |",
        "|---|---|---:|---:|---:|---:|",
        *(t.row() for t in p.tiers),
        "",
        f'- buckets one hot sale needs (`"buckets"` at create): {p.hot_sale_buckets}',
    ]
    if p.in_flight_joins is not None:
        lines.append(
            f"- joins in flight at the peak (Little's law, p50 {costs.join_p50_ms} ms): "
            f"{p.in_flight_joins:,.0f}"
        )
    lines.append(f"- first bottleneck: {p.bottleneck}")
    lines += [f"- {note}" for note in p.notes]
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace the generated section of ``path`` (added at its end the first time)."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        new = head + text + ("\n" + tail if tail else "")
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + text
    path.write_text(new, encoding="utf-8")


def main(
    *,
    source: str,
    peak_joins: float,
    storefront_rps: float,
    target: float,
    storefront_gateway_us: float | None,
    storefront_postgres_us: float | None,
    write: str | None,
) -> str:
    path = Path(source)
    if not path.exists():
        raise CapacityError(f"{source} not found: run `flashsale bench --out {source}` first")
    try:
        bench = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise CapacityError(f"{source} is not JSON: {exc}") from None
    if not isinstance(bench, dict):
        raise CapacityError(f"{source} is not a flashsale bench result")
    costs = read_costs(
        bench,
        storefront_gateway_us=storefront_gateway_us,
        storefront_postgres_us=storefront_postgres_us,
    )
    text = render(
        plan(costs, peak_joins=peak_joins, storefront_rps=storefront_rps, target=target),
        costs,
        source,
    )
    if write:
        write_section(Path(write), text)
    return text
