"""The dependency map (链路梳理 / 强弱依赖): for every route, which store it needs strongly
(it cannot answer without it) or weakly (it degrades), and what it answers while that
store is gone. Served to admins as JSON (``GET /api/v1/admin/dependencies``), written out
in docs/plans.md, and held by tests/test_dependency_map.py, which takes each store away
(a real process killed) and checks every route's answer against this table.

Never a 500: a store that is gone is a 503 with Retry-After (or a degraded 200).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from gateway.routing import Route

POSTGRES, REDIS, KAFKA = "postgres", "redis", "kafka"
STORES: Final = (POSTGRES, REDIS, KAFKA)
STRONG, WEAK, NONE = "strong", "weak", "none"

STORE_ROLES: Final = {
    POSTGRES: "the system of record: accounts, catalog, carts, orders, payments, sales",
    REDIS: "flash-sale stock and reservations, the waiting room, token revocations, plan "
    "switches, caches",
    KAFKA: "the order events between an accepted join and its order row",
}

RETRY: Final = "503 RETRY_LATER with Retry-After"
AUTH_STALE: Final = (
    "as usual until the revocation list is FLASHSALE_REVOCATION_MAX_STALE_S old, then 503 "
    "AUTH_UNAVAILABLE (a token can no longer be vouched for)"
)


@dataclass(frozen=True, slots=True)
class Need:
    need: str
    when_gone: str
    plan: str | None = None

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = {"need": self.need, "when_gone": self.when_gone}
        if self.plan:
            out["plan"] = self.plan
        return out


_NOTHING: Final = Need(NONE, "unaffected")

# Routes that never read PostgreSQL (the flash path reads Redis and its in-process copy).
_NO_POSTGRES: Final = {
    ("GET", "/healthz"),
    ("GET", "/metrics"),
    ("GET", "/api/v1/openapi.json"),
    ("GET", "/api/v1/docs"),
    ("GET", "/api/v1/flash-sales/active"),
    ("GET", "/api/v1/flash-sales/{sale_id}"),
    ("POST", "/api/v1/flash-sales/{sale_id}/join"),
    ("POST", "/api/v1/flash-sales/{sale_id}/join/{admission}"),
    ("GET", "/api/v1/flash-sales/{sale_id}/queue"),
    ("GET", "/api/v1/flash-sales/{sale_id}/events"),
    ("GET", "/api/v1/flash-sales/{sale_id}/challenge"),
    ("GET", "/api/v1/payment/methods"),
    ("GET", "/dashboard"),
    ("GET", "/sale/{sale_id}"),
    ("GET", "/static/{name}"),
    ("GET", "/static/vendor/{name}"),
    ("GET", "/api/v1/admin/plans"),
    ("PUT", "/api/v1/admin/plans/{name}"),
    ("GET", "/api/v1/admin/dependencies"),
}
_QUEUE_ENTRY: Final = ("POST", "/api/v1/flash-sales/{sale_id}/enter")
_CATALOG_READS: Final = {
    ("GET", "/api/v1/products"),
    ("GET", "/api/v1/products/{id}"),
    ("GET", "/api/v1/categories"),
}
# Routes whose answer itself is made in Redis (beyond the token check).
_REDIS_STRONG: Final = {
    ("POST", "/api/v1/flash-sales/{sale_id}/join"),
    ("POST", "/api/v1/flash-sales/{sale_id}/join/{admission}"),
    ("POST", "/api/v1/flash-sales/{sale_id}/enter"),
    ("GET", "/api/v1/flash-sales/{sale_id}/queue"),
    ("POST", "/api/v1/admin/flash-sales"),
    ("PATCH", "/api/v1/admin/flash-sales/{sale_id}"),
    ("POST", "/api/v1/admin/flash-sales/{sale_id}/close"),
    ("POST", "/api/v1/auth/login"),
    ("POST", "/api/v1/auth/register"),
    ("GET", "/api/v1/admin/plans"),
    ("PUT", "/api/v1/admin/plans/{name}"),
}
_KAFKA_STRONG: Final = {
    ("POST", "/api/v1/flash-sales/{sale_id}/join"),
    ("POST", "/api/v1/flash-sales/{sale_id}/join/{admission}"),
}
_READINESS: Final = ("GET", "/readyz")


def _postgres(r: Route) -> Need:
    key = (r.method, r.path)
    if key == _READINESS:
        return Need(WEAK, "503 not ready, naming the store (a balancer drains the worker)")
    if key in _NO_POSTGRES:
        return _NOTHING
    if key == _QUEUE_ENTRY:
        return Need(WEAK, RETRY + " where the sale's bot defence reads the account's age")
    if key in _CATALOG_READS:
        return Need(
            WEAK,
            RETRY + "; with catalog-from-cache on: the last copy kept in Redis, marked stale",
            plan="catalog-from-cache",
        )
    return Need(STRONG, RETRY)


def _redis(r: Route) -> Need:
    key = (r.method, r.path)
    if key == _READINESS:
        return Need(WEAK, "503 not ready, naming the store (a balancer drains the worker)")
    if key in _REDIS_STRONG:
        return Need(STRONG, RETRY)
    if key in {("GET", "/api/v1/flash-sales/active"), ("GET", "/api/v1/flash-sales/{sale_id}")}:
        return Need(WEAK, "the worker's in-process copy of the sales, as of the last refresh")
    if key in _CATALOG_READS:
        return Need(WEAK, "from PostgreSQL (the detail cache and the stale copies are skipped)")
    if r.auth not in (None, "optional"):
        return Need(STRONG, AUTH_STALE)
    return _NOTHING


def _kafka(r: Route) -> Need:
    key = (r.method, r.path)
    if key == _READINESS:
        return Need(WEAK, "503 not ready, naming the store (a balancer drains the worker)")
    if key in _KAFKA_STRONG:
        return Need(
            STRONG,
            RETRY + " after FLASHSALE_KAFKA_PRODUCE_TIMEOUT_MS; the reserved unit is given back",
        )
    return _NOTHING


def route_needs(r: Route) -> dict[str, Need]:
    return {POSTGRES: _postgres(r), REDIS: _redis(r), KAFKA: _kafka(r)}


def dependency_map(routes: Sequence[Route]) -> dict[str, Any]:
    """The map as JSON: the stores, and per route what it needs of each."""
    return {
        "stores": dict(STORE_ROLES),
        "routes": [
            {
                "method": r.method,
                "path": r.path,
                "tag": r.tag,
                "auth": r.auth,
                "needs": {store: need.public() for store, need in route_needs(r).items()},
            }
            for r in routes
        ],
    }


def markdown(routes: Sequence[Route]) -> str:
    """The map as the table of docs/plans.md (tests/test_dependency_map.py keeps it current)."""
    lines = [
        "| route | PostgreSQL | Redis | Kafka |",
        "|---|---|---|---|",
    ]
    for r in routes:
        cells = []
        for need in route_needs(r).values():
            cells.append("—" if need.need == NONE else f"**{need.need}**: {need.when_gone}")
        lines.append(f"| `{r.method} {r.path}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
