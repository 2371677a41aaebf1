"""The contingency plans on the app (flashsale/plans.py): this worker's switches kept in
force, the gate that applies ``read-only`` and ``shed-storefront`` to each request, the
trigger of ``catalog-from-cache`` and the catalog's stale copies.

The gate costs a request two attribute reads while no gating plan is on; the join path
reads its plan there and nowhere else (no Redis round trip, ever).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

from aiohttp import web
from redis.asyncio import Redis

from flashsale import plans
from flashsale.errors import ServiceUnavailable, ShopReadOnly
from flashsale.stores import tasks
from flashsale.stores.redisclient import open_redis
from flashsale.timing import (
    CONNECT_TIMEOUT_S,
    CPU_SAMPLE_S,
    SHED_RETRY_AFTER_S,
    STORE_PROBE_EVERY_S,
    STORE_PROBE_TIMEOUT_S,
)
from gateway import appkeys
from gateway.http import JSON_CONTENT_TYPE, dumps, ok
from gateway.routing import ROUTE_TABLE, Handler

log = logging.getLogger(__name__)

SWITCHES: Final = web.AppKey("plan_switches", plans.Switches)
COPIES: Final = web.AppKey("catalog_copies", plans.CatalogCopies)
CPU: Final = web.AppKey("worker_cpu", list)  # [percent of one core over the last second]
STORES_UP: Final = web.AppKey("stores_up", dict)  # store -> its last probe answered

# Never gated: the plan switches themselves (an admin must be able to close a plan),
# logging in (to reach them), payment notifications (money that arrives is recorded),
# and the ops routes.
_NEVER_GATED: Final = frozenset(
    {
        ("POST", "/api/v1/auth/login"),
        ("PUT", "/api/v1/admin/plans/{name}"),
        ("POST", "/api/v1/payment/notify"),
    }
)
# The flash path: joins, the waiting room and the sale pages keep their cores when the
# storefront is shed.
_FLASH_TAGS: Final = frozenset({"flash-sales", "waiting-room", "pages", "ops", "dashboard"})
_READS: Final = frozenset({"GET", "HEAD", "OPTIONS"})

# What the gate does with a route while a plan is on.
PASS, STOREFRONT, WRITE = 0, 1, 2


def _route_classes(app: web.Application) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for r in app[ROUTE_TABLE]:
        key = (r.method, r.path)
        if key in _NEVER_GATED or r.tag == "ops":
            out[key] = PASS
        elif r.tag in _FLASH_TAGS or r.path.startswith("/api/v1/admin/"):
            # the flash path and the operators: never shed; read-only refuses their writes
            out[key] = PASS if r.method in _READS else WRITE
        else:
            out[key] = STOREFRONT
    return out


def make_plan_gate(switches: plans.Switches, app: web.Application) -> Any:
    classes: dict[tuple[str, str], int] = {}
    cpu: list[float] = app[CPU]
    shed_cpu = app[appkeys.SETTINGS].shed_cpu_percent

    @web.middleware
    async def plan_gate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not (switches.read_only or switches.shed_storefront):
            return await handler(request)
        if not classes:
            classes.update(_route_classes(app))
        info = request.match_info
        route = info.route if info is not None else None
        canonical = route.resource.canonical if route and route.resource else ""
        kind = classes.get((request.method, canonical), PASS)
        if kind == PASS:
            return await handler(request)
        write = request.method not in _READS
        if switches.read_only and write:
            raise ShopReadOnly
        if (
            kind == STOREFRONT
            and switches.shed_storefront
            and (write or switches.shed_reads)
            and cpu[0] >= shed_cpu
        ):
            raise ServiceUnavailable(
                "the storefront is shed during a hot sale; retry shortly",
                headers={"Retry-After": str(SHED_RETRY_AFTER_S)},
            )
        return await handler(request)

    return plan_gate


async def catalog_page(request: web.Request, read: Callable[[], Awaitable[Any]]) -> web.Response:
    """A catalog page: from PostgreSQL (its copy kept), or, while ``catalog-from-cache``
    is on, the copy marked stale; no copy → 503 RETRY_LATER."""
    page = request.path_qs
    copies = request.app[COPIES]
    if not request.app[SWITCHES].catalog_from_cache:
        data = await read()
        await copies.remember(page, data)
        return ok(data)
    copy = await copies.recall(page)
    if copy is None:
        raise ServiceUnavailable(
            "the catalog is served from its cached copy and this page has none; retry later",
            headers={"Retry-After": "5"},
        )
    as_of, data = copy
    body = {
        "code": 200,
        "message": "stale: served from the catalog cache while the database is unavailable",
        "data": data,
        "stale": True,
        "as_of": as_of,
    }
    return web.Response(body=dumps(body), content_type=JSON_CONTENT_TYPE, headers={"X-Stale": "1"})


async def _sample_cpu(cpu: list[float]) -> None:
    """This worker's CPU over the last second, as a percent of one core."""
    wall, used = time.monotonic(), time.process_time()

    async def sample() -> None:
        nonlocal wall, used
        now_wall, now_used = time.monotonic(), time.process_time()
        cpu[0] = 100.0 * (now_used - used) / max(now_wall - wall, 1e-6)
        wall, used = now_wall, now_used

    # errors=(): no I/O, so no store error to live through; a failure is a bug
    await tasks.guarded_loop(
        sample, name="cpu sample", every_s=CPU_SAMPLE_S, errors=(), wait_first=True
    )


async def probe_stores(app: web.Application, own: Redis, up: dict[str, bool]) -> None:
    """Every ``STORE_PROBE_EVERY_S``: can this worker reach each store? For the metric
    ``flashsale_store_up`` (the alert FlashsaleStoreDown) and the plan triggers."""
    from gateway.routes.health import check_db, check_redis

    gauge = app[appkeys.METRICS].store_up

    async def probe() -> None:
        checks = await asyncio.gather(
            check_db(app),
            check_redis(own, STORE_PROBE_TIMEOUT_S),
            app[appkeys.PRODUCER].ping(STORE_PROBE_TIMEOUT_S),
        )
        for store, answered in zip(("postgres", "redis", "kafka"), checks, strict=True):
            up[store] = answered
            gauge.labels(store).set(1 if answered else 0)

    await tasks.guarded_loop(probe, name="store probes", every_s=STORE_PROBE_EVERY_S)


async def watch_database(app: web.Application, redis: Redis, stop: asyncio.Event) -> None:
    """The trigger of ``catalog-from-cache``, with hysteresis: armed and PostgreSQL out of
    reach for ``plan_arm_after_s`` → on; on by itself and PostgreSQL answering for
    ``plan_disarm_after_s`` → armed again (reads :func:`probe_stores`' last answer). Every
    worker watches; the switch script lets the first move through and ignores the rest."""
    s = app[appkeys.SETTINGS]
    switches, up = app[SWITCHES], app[STORES_UP]
    down_since: float | None = None
    up_since: float | None = None

    async def look() -> None:
        nonlocal down_since, up_since
        state = switches.states[plans.CATALOG_FROM_CACHE]
        watching = state.mode == plans.ARMED or (state.on and state.auto)
        if not watching:
            down_since = up_since = None
            return
        now = time.monotonic()
        if up.get("postgres", True):
            down_since = None
            up_since = up_since or now
        else:
            up_since = None
            down_since = down_since or now
        move: tuple[str, str] | None = None
        if state.mode == plans.ARMED and down_since and now - down_since >= s.plan_arm_after_s:
            move = (plans.ON, f"PostgreSQL out of reach for {now - down_since:.0f}s")
        elif state.on and up_since and now - up_since >= s.plan_disarm_after_s:
            move = (plans.ARMED, f"PostgreSQL answering again for {now - up_since:.0f}s")
        if move is None:
            return
        if await plans.switch(
            redis, plans.CATALOG_FROM_CACHE, move[0], by=plans.AUTO, reason=move[1], auto=True
        ):
            log.warning("plan %s switched %s: %s", plans.CATALOG_FROM_CACHE, *move)
        await switches.refresh(redis)

    await tasks.guarded_loop(
        look,
        name=f"plan trigger of {plans.CATALOG_FROM_CACHE}",
        every_s=STORE_PROBE_EVERY_S,
        wait_first=True,
        stop=stop,
    )


async def plans_ctx(app: web.Application) -> AsyncIterator[None]:
    switches, metrics = app[SWITCHES], app[appkeys.METRICS]

    def export(current: plans.Switches) -> None:
        for name, state in current.states.items():
            metrics.plan_on.labels(name).set(1 if state.on else 0)

    export(switches)
    switches.on_change.append(export)
    app[COPIES] = plans.CatalogCopies(app[appkeys.REDIS])
    app[STORES_UP] = {}
    settings = app[appkeys.SETTINGS]
    # a client of its own (a subscriber holds a connection for good): the plans' machinery
    # never takes a connection the requests' pool may need
    own: Redis = open_redis(
        settings,
        decode_responses=False,
        max_connections=4,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
    )
    stop = asyncio.Event()
    try:
        async with plans.kept_in_force(switches, own, every_s=settings.plan_poll_ms / 1000):
            loops = [
                asyncio.create_task(_sample_cpu(app[CPU]), name="worker-cpu"),
                asyncio.create_task(probe_stores(app, own, app[STORES_UP]), name="store-probes"),
                asyncio.create_task(watch_database(app, own, stop), name="plan-trigger-db"),
            ]
            try:
                yield
            finally:
                stop.set()
                await tasks.stop(*loops)
    finally:
        await own.aclose()
