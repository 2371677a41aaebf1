"""Lua scripts: loaded once from ``lua/*.lua`` and registered on a client.

Calls go through redis-py's script objects: EVALSHA, with a reload on NOSCRIPT
(after a Redis restart or SCRIPT FLUSH). Each script's result codes are named by one
``IntEnum`` here, and every ``lua/*.lua`` header lists its codes in one form::

    -- Returns (flashsale/stores/scripts.py <Enum>) <shape of the result>:
    --   <code> <MEMBER> <what it means>

``tests/test_scripts.py`` holds each enum against its script's header.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from functools import cache
from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript


@cache
def source(name: str) -> str:
    """The text of ``lua/<name>.lua``."""
    return (resources.files("lua") / f"{name}.lua").read_text(encoding="utf-8")


def register(client: Redis, name: str) -> AsyncScript:
    return client.register_script(source(name))


@dataclass(frozen=True, slots=True)
class FlashScripts:
    reserve: AsyncScript
    release: AsyncScript
    claim: AsyncScript
    return_units: AsyncScript
    load: AsyncScript
    close: AsyncScript
    give: AsyncScript
    take: AsyncScript

    @classmethod
    def register(cls, client: Redis) -> FlashScripts:
        return cls(
            reserve=register(client, "reserve"),
            release=register(client, "release"),
            claim=register(client, "claim"),
            return_units=register(client, "return_units"),
            load=register(client, "sale_load"),
            close=register(client, "sale_close"),
            give=register(client, "bucket_give"),
            take=register(client, "bucket_take"),
        )

    async def preload(self, client: Redis) -> None:
        """SCRIPT LOAD every script so the first pipelined EVALSHA finds it."""
        for script in (
            self.reserve,
            self.release,
            self.claim,
            self.return_units,
            self.load,
            self.close,
            self.give,
            self.take,
        ):
            await client.script_load(script.script)


class Reserve(IntEnum):
    """lua/reserve.lua's status codes."""

    RESERVED = 0
    REPLAY = 1
    IDEMPOTENCY_MISMATCH = 2
    USER_RATE_LIMITED = 3
    IP_RATE_LIMITED = 4
    NOT_STARTED = 5
    ENDED = 6
    LIMIT_EXCEEDED = 7
    SOLD_OUT = 8
    INSUFFICIENT = 9
    UNKNOWN_SALE = 10
    RECOVERING = 11


class Claim(IntEnum):
    """lua/claim.lua's per-order codes."""

    NOT_IN_REDIS = 0
    CLAIMED = 1
    ALREADY_CLAIMED = 2
    VOIDED = 3


class Rearm(IntEnum):
    """lua/sale_rearm.lua's result."""

    FENCE_CHANGED = -2
    RUN_CHANGED = -1
    ALREADY_ARMED = 0
    ARMED = 1


class Give(IntEnum):
    """lua/bucket_give.lua's status codes."""

    GIVEN = 0
    EMPTY = 1
    RECOVERING = 2
    GIVING = 3


class Take(IntEnum):
    """lua/bucket_take.lua's result."""

    STALE = -1
    ALREADY = 0
    CREDITED = 1
    RECOVERING = 2


class Release(IntEnum):
    """lua/release.lua's result."""

    CLAIMED = 0
    RELEASED = 1
    NOT_FOUND = 2


class ReturnUnits(IntEnum):
    """lua/return_units.lua's result."""

    UNKNOWN_SALE = -1
    ALREADY_RETURNED = 0
    RETURNED = 1


class SaleLoad(IntEnum):
    """lua/sale_load.lua's status, in place of ``{remaining, allotment}``."""

    CLOSED = -1


class SaleClose(IntEnum):
    """lua/sale_close.lua's status, in place of ``moved_out`` (never negative)."""

    UNKNOWN_SALE = -1


class QueueEnter(IntEnum):
    """lua/queue_enter.lua's status codes."""

    ENTERED = 0
    ALREADY_IN = 1
    ACCOUNT_LIMIT = 2
    IP_LIMIT = 3
    DEVICE_LIMIT = 4
    NOT_OPEN = 5
    ENDED = 6
    SOLD_OUT = 7
    UNKNOWN_SALE = 8
    NOT_QUEUED = 9


class QueueAdmit(IntEnum):
    """lua/queue_admit.lua's status codes."""

    ADMITTED = 0
    IDLE = 1
    SOLD_OUT = 2
    NOT_STARTED = 3
    ENDED = 4
    UNKNOWN_SALE = 5
    RECOVERING = 6


class Lease(IntEnum):
    """lua/machine_lease.lua's result."""

    TAKEN = 0
    HELD = 1


class PlanSwitch(IntEnum):
    """lua/plan_switch.lua's result."""

    UNCHANGED = 0
    SWITCHED = 1


# Which enum names each script's results (every lua/*.lua has one).
RESULTS: dict[str, type[IntEnum]] = {
    "bucket_give": Give,
    "bucket_take": Take,
    "claim": Claim,
    "machine_lease": Lease,
    "plan_switch": PlanSwitch,
    "queue_admit": QueueAdmit,
    "queue_enter": QueueEnter,
    "release": Release,
    "reserve": Reserve,
    "return_units": ReturnUnits,
    "sale_close": SaleClose,
    "sale_load": SaleLoad,
    "sale_rearm": Rearm,
}
