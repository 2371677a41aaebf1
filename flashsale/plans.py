"""Contingency plans (预案): named switches an operator chooses from on a sale day.

Each plan is documented here once (what it does, its trigger, who may flip it, how it is
closed) and its state lives in Redis, so that one flip reaches every worker of every host:

* ``fs:{plans}:state``, a hash plan → JSON ``{"mode", "auto", "by", "at", "reason",
  "options"}``; a mode is ``off``, ``armed`` (the plan's trigger may switch it on) or ``on``;
* ``fs:{plans}:version``, a counter bumped with every change;
* ``fs:{plans}:log``, a stream: the operation log of the plans (who, when, from, to, why);
* ``fs:plans:changed``, a pub/sub channel that carries the new version.

Every change goes through ``lua/plan_switch.lua`` (one atomic step: state, version, log,
publish), which also makes a trigger's move idempotent: N workers seeing PostgreSQL go
write one log line. Each worker keeps the states in a :class:`Switches` object, kept in
force the way token revocations are (``flashsale/sessions.py``): a subscriber applies a
change as it is published, a poller re-reads the version every ``plan_poll_ms`` (a message
lost with a dropped connection). A request reads a plain attribute: no I/O.

The log lives with the switches in Redis on purpose: ``catalog-from-cache`` switches on
when PostgreSQL is gone, and its log line must be written then.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import asyncpg
import orjson
from redis.asyncio import Redis

from flashsale.errors import NotFound, ValidationFailed
from flashsale.stores.follow import followed
from flashsale.stores.redisclient import leaks_as_connection_errors
from flashsale.stores.rediskeys import (
    PLANS_CHANGED,
    PLANS_LOG,
    PLANS_STATE,
    PLANS_VERSION,
    catalog_copy,
)
from flashsale.stores.scripts import FlashScripts, PlanSwitch, register
from flashsale.stores.tasks import STORE_ERRORS
from flashsale.timing import CATALOG_COPY_REFRESH_S, CATALOG_COPY_TTL_S
from flashsale.waitingroom.room import set_mode

log = logging.getLogger(__name__)

LOG_KEPT: Final = 1000  # operation-log entries kept (approximately: MAXLEN ~)

OFF: Final = "off"
ARMED: Final = "armed"
ON: Final = "on"
MODES: Final = (OFF, ARMED, ON)

CATALOG_FROM_CACHE: Final = "catalog-from-cache"
SHED_STOREFRONT: Final = "shed-storefront"
PAUSE_BACKGROUND: Final = "pause-background"
READ_ONLY: Final = "read-only"
QUEUE_SALE: Final = "queue-sale"

AUTO: Final = "auto"  # the ``by`` of a move made by a plan's own trigger


@dataclass(frozen=True, slots=True)
class Plan:
    """One plan as the runbook states it."""

    name: str
    does: str
    trigger: str
    who: str
    closing: str
    arms_itself: bool = False
    options: tuple[str, ...] = ()

    def public(self) -> dict[str, Any]:
        return {**asdict(self), "options": list(self.options)}


PLANS: Final[dict[str, Plan]] = {
    p.name: p
    for p in (
        Plan(
            CATALOG_FROM_CACHE,
            does="product list, product detail and categories are answered from the last "
            "copy kept in Redis, marked stale (data.stale, X-Stale: 1); what lives only in "
            "PostgreSQL (carts, orders, payments, accounts) answers 503 RETRY_LATER with "
            "Retry-After; flash-sale pages and joins go on (they never read PostgreSQL)",
            trigger="PostgreSQL out of reach (alert FlashsaleStoreDown{store=postgres}); "
            "when armed, switches itself on after FLASHSALE_PLAN_ARM_AFTER_S seconds of "
            "failed probes",
            who="admin (API, CLI, dashboard); the trigger itself when armed",
            closing="an automatic switch-on closes itself after "
            "FLASHSALE_PLAN_DISARM_AFTER_S seconds of PostgreSQL answering (back to armed); "
            "a manual one is switched off by an admin once /readyz is green",
            arms_itself=True,
        ),
        Plan(
            SHED_STOREFRONT,
            does="non-flash writes (cart, orders, payments, addresses, reviews of the "
            "back office) answer 503 RETRY_LATER with Retry-After while this worker's CPU "
            "is above FLASHSALE_SHED_CPU_PERCENT (0: always); with the option 'reads' the "
            "storefront reads too; joins, the waiting room and the flash pages keep their "
            "cores",
            trigger="join p99 over its objective during a hot sale (alert "
            "FlashsaleJoinLatencyHigh) while storefront traffic is high",
            who="admin",
            closing="switched off by an admin when the hot sale has sold out or ended",
            options=("reads",),
        ),
        Plan(
            PAUSE_BACKGROUND,
            does="the gateways stop computing the dashboard's per-second snapshots and its "
            "history (open dashboards show the last one); payment expiry, the order "
            "sweepers and reconcile on demand never pause",
            trigger="CPU or Redis saturated during a sale (alerts FlashsaleJoinLatencyHigh, "
            "FlashsaleConsumerLagHigh)",
            who="admin",
            closing="switched off by an admin after the peak; history resumes from then",
        ),
        Plan(
            QUEUE_SALE,
            does="moves one running open sale (option sale_id) into the waiting room: from "
            "then on a join needs an admission; every reservation already made stays, and "
            "the room admits against what is left; off moves it back to open",
            trigger="join p99 high (FlashsaleJoinLatencyHigh) on a hot sale whose crowd is "
            "many times its stock, before it opens or while it runs",
            who="admin",
            closing="switched off (back to open) by an admin, or left on until the sale ends",
            options=("sale_id",),
        ),
        Plan(
            READ_ONLY,
            does="the shop answers reads only: every write, joins included, answers 503 "
            "READ_ONLY with Retry-After (admin plan switches, login and payment "
            "notifications excepted, so money that arrives is still recorded)",
            trigger="data at risk: reconcile drift (alerts FlashsaleStockDrift, "
            "FlashsaleMoneyDrift) or dead letters piling up",
            who="admin",
            closing="switched off by an admin once reconcile is clean",
        ),
    )
}


@dataclass(frozen=True, slots=True)
class PlanState:
    name: str
    mode: str = OFF
    auto: bool = False
    by: str = ""
    at: float = 0.0
    reason: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def on(self) -> bool:
        return self.mode == ON

    def public(self) -> dict[str, Any]:
        return {**asdict(self), "on": self.on}

    @classmethod
    def decode(cls, name: str, raw: bytes | str) -> PlanState:
        data = orjson.loads(raw)
        return cls(
            name=name,
            mode=data.get("mode", OFF),
            auto=bool(data.get("auto")),
            by=str(data.get("by", "")),
            at=float(data.get("at", 0.0)),
            reason=str(data.get("reason", "")),
            options=dict(data.get("options") or {}),
        )


class Switches:
    """This worker's copy of every plan's state; the flags below are read per request."""

    def __init__(self) -> None:
        self.states: dict[str, PlanState] = {name: PlanState(name) for name in PLANS}
        self.catalog_from_cache = False
        self.shed_storefront = False
        self.shed_reads = False
        self.pause_background = False
        self.read_only = False
        self.synced_at = 0.0
        self._version: bytes | None = None
        self.on_change: list[Callable[[Switches], None]] = []

    def on(self, name: str) -> bool:
        return self.states[name].on

    def apply(self, states: dict[str, PlanState]) -> None:
        merged = {name: states.get(name, PlanState(name)) for name in PLANS}
        changed = merged != self.states
        self.states = merged
        self.catalog_from_cache = merged[CATALOG_FROM_CACHE].on
        self.shed_storefront = merged[SHED_STOREFRONT].on
        self.shed_reads = bool(merged[SHED_STOREFRONT].options.get("reads"))
        self.pause_background = merged[PAUSE_BACKGROUND].on
        self.read_only = merged[READ_ONLY].on
        if changed:
            for callback in self.on_change:
                callback(self)

    async def refresh(self, redis: Redis) -> None:
        """Re-read the states when the version moved."""
        version = await redis.get(PLANS_VERSION)
        if version is None or version != self._version:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.get(PLANS_VERSION)
                pipe.hgetall(PLANS_STATE)
                version, entries = await pipe.execute()
            states = {}
            for raw_name, raw in entries.items():
                name = _text(raw_name)
                if name in PLANS:
                    states[name] = PlanState.decode(name, raw)
            self.apply(states)
            self._version = version
        self.synced_at = time.time()

    def public(self) -> list[dict[str, Any]]:
        return [self.states[name].public() | PLANS[name].public() for name in PLANS]


async def queue_sale(
    db: asyncpg.Pool,
    redis: Redis,
    scripts: FlashScripts,
    sale_id: int,
    *,
    queued: bool,
    by: str,
    reason: str = "",
) -> bool:
    """The ``queue-sale`` plan: the sale's mode moved (PostgreSQL, then the sale hash, as any
    mode change: its reservations and counters are not touched), then the move logged."""
    await set_mode(db, redis, scripts, sale_id, "queued" if queued else "open", None)
    return await switch(
        redis,
        QUEUE_SALE,
        ON if queued else OFF,
        by=by,
        reason=f"sale {sale_id}" + (f": {reason}" if reason else ""),
        options={"sale_id": sale_id},
    )


def plan_named(name: str) -> Plan:
    plan = PLANS.get(name)
    if plan is None:
        raise NotFound(f"no plan named {name!r}; plans: {', '.join(PLANS)}")
    return plan


async def switch(
    redis: Redis,
    name: str,
    mode: str,
    *,
    by: str,
    reason: str = "",
    auto: bool = False,
    options: dict[str, Any] | None = None,
) -> bool:
    """Move plan ``name`` to ``mode``; True when it moved (then logged and published).

    ``auto``: the plan's own trigger moves it (armed → on, or its own on → armed).
    """
    plan = plan_named(name)
    if mode not in MODES:
        raise ValidationFailed(fields={"mode": f"one of {', '.join(MODES)}"})
    if mode == ARMED and not plan.arms_itself:
        raise ValidationFailed(fields={"mode": f"{name} has no trigger of its own to arm"})
    unknown = set(options or {}) - set(plan.options)
    if unknown:
        raise ValidationFailed(fields={"options": f"{name} takes: {list(plan.options)}"})
    state = {
        "mode": mode,
        "auto": auto and mode == ON,
        "by": by,
        "at": time.time(),
        "reason": reason,
        "options": options or {},
    }
    result = await register(redis, "plan_switch")(
        keys=[PLANS_STATE, PLANS_VERSION, PLANS_LOG],
        args=[
            name,
            mode,
            orjson.dumps(state),
            "1" if auto else "0",
            LOG_KEPT,
            PLANS_CHANGED,
            by,
            reason,
        ],
    )
    return PlanSwitch(int(result)) is PlanSwitch.SWITCHED


async def operation_log(redis: Redis, count: int = 100) -> list[dict[str, Any]]:
    """The newest ``count`` moves of any plan, newest first."""
    entries = await redis.xrevrange(PLANS_LOG, count=count) or []
    out = []
    for entry_id, fields in entries:
        if entry_id is None or fields is None:
            continue
        row: dict[str, Any] = {_text(k): _text(v) for k, v in fields.items()}
        row["at"] = int(_text(entry_id).split("-", 1)[0]) / 1000
        row["auto"] = row.get("auto") == "1"
        out.append(row)
    return out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@contextlib.asynccontextmanager
async def kept_in_force(switches: Switches, redis: Redis, *, every_s: float) -> AsyncIterator[None]:
    """Load the states, then follow every change (published, or found by the poller).

    Redis down at start: every plan reads off until it answers (a plan is a choice made
    in Redis; without Redis there is no choice to follow)."""
    try:
        with leaks_as_connection_errors():
            await switches.refresh(redis)
    except STORE_ERRORS as exc:
        log.warning("plan states not loaded at start (%s)", exc)
    async with followed(
        redis, PLANS_CHANGED, lambda: switches.refresh(redis), every_s=every_s, what="plan states"
    ):
        yield


# --- catalog-from-cache: the last good answer of each catalog page -----------------------


class CatalogCopies:
    """Keeps the last good answer of each catalog page in Redis, at most once every
    ``CATALOG_COPY_REFRESH_S`` per page and worker, so that the copy costs the catalog almost
    nothing while PostgreSQL is up; serves it, marked stale, while the plan is on."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._written: dict[str, float] = {}

    async def remember(self, page: str, data: Any) -> None:
        now = time.monotonic()
        if now - self._written.get(page, -CATALOG_COPY_REFRESH_S) < CATALOG_COPY_REFRESH_S:
            return
        self._written[page] = now
        if len(self._written) > 100_000:  # searches are unbounded: forget, rewrite later
            self._written.clear()
        copy = orjson.dumps({"as_of": time.time(), "data": data})
        try:
            with leaks_as_connection_errors():
                await self._redis.set(catalog_copy(page), copy, ex=CATALOG_COPY_TTL_S)
        except STORE_ERRORS as exc:
            log.warning("catalog copy of %s not kept: %s", page, exc)

    async def recall(self, page: str) -> tuple[float, Any] | None:
        """(as_of, data) of the page's copy, or None when no copy was kept."""
        raw = await self._redis.get(catalog_copy(page))
        if raw is None:
            return None
        copy = orjson.loads(raw)
        return float(copy["as_of"]), copy["data"]
