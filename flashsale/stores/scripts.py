"""Lua scripts: loaded once from ``lua/*.lua`` and registered on a client.

Calls go through redis-py's script objects: EVALSHA, with a reload on NOSCRIPT
(after a Redis restart or SCRIPT FLUSH). Each script's result codes are named by one
``IntEnum`` here, and every ``lua/*.lua`` header lists its codes in one form::

    -- Returns (flashsale/stores/scripts.py <Enum>) <shape of the result>:
    --   <code> <MEMBER> <what it means>

``tests/test_scripts.py`` holds each enum against its script's header.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from functools import cache
from importlib import resources
from typing import Any, Final, NamedTuple

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


class ReserveResult(NamedTuple):
    """lua/reserve.lua's reply by name; a field the status does not carry is 0 or ""."""

    status: Reserve
    order_id: str  # REPLAY: the earlier order; LIMIT_EXCEEDED: the shopper's first, or ""
    deadline_ms: int  # RESERVED, REPLAY: the order's payment deadline
    remaining: int  # RESERVED: units left after it; INSUFFICIENT: units left
    retry_ms: int  # USER_RATE_LIMITED, IP_RATE_LIMITED: when a token is there again


def parse_reserve(res: Sequence[Any]) -> ReserveResult:
    """Name the fields of lua/reserve.lua's reply: one tuple, built without the
    NamedTuple's Python-level ``__new__`` (the join path runs this once a join)."""
    status = _RESERVE[int(res[0])]  # an index, not Reserve(...): a third of the cost
    if status is Reserve.RESERVED:  # the order id is the caller's own: not decoded again
        return _new(ReserveResult, (status, "", int(res[2]), int(res[3]), 0))
    if status is Reserve.REPLAY:
        return _new(ReserveResult, (status, _text(res[1]), int(res[2]), 0, 0))
    if status is Reserve.INSUFFICIENT:
        return _new(ReserveResult, (status, "", 0, int(res[1]), 0))
    if status is Reserve.USER_RATE_LIMITED or status is Reserve.IP_RATE_LIMITED:
        return _new(ReserveResult, (status, "", 0, 0, int(res[1])))
    if status is Reserve.LIMIT_EXCEEDED and len(res) > 1:
        return _new(ReserveResult, (status, _text(res[1]), 0, 0, 0))
    return _new(ReserveResult, (status, "", 0, 0, 0))


_new: Final = tuple.__new__
_RESERVE: Final = tuple(Reserve)  # codes 0..n, in order (tests/test_scripts.py)

# ARGV[10] of lua/reserve.lua: the same attempt again (no second rate-limit token).
AGAIN: Final = "1"


def reserve_args(
    user_id: int,
    quantity: int,
    order_id: str,
    idem_field: str,
    fingerprint: str,
    user_rate_per_s: float,
    user_burst: float,
    ip_rate_per_s: float,
    ip_burst: float,
) -> list[Any]:
    """lua/reserve.lua's ARGV 1 to 9, in its order, beside its KEYS
    (``rediskeys.reserve_keys``). The batcher appends the run id; ``[*args, AGAIN]``
    makes the same attempt again."""
    return [
        user_id,
        quantity,
        order_id,
        idem_field,
        fingerprint,
        user_rate_per_s,
        user_burst,
        ip_rate_per_s,
        ip_burst,
    ]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


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


class GiveResult(NamedTuple):
    """lua/bucket_give.lua's reply by name."""

    status: Give
    units: int  # GIVEN: units now in transit to the taker
    transfer: str  # GIVEN: the transfer's id, for bucket_take.lua
    moves: int  # EMPTY, GIVING: the giver's count of moves when it answered


def parse_give(res: Sequence[Any]) -> GiveResult:
    status = Give(int(res[0]))
    if status is Give.GIVEN:
        return GiveResult(status, int(res[1]), _text(res[2]), 0)
    if status is Give.EMPTY or status is Give.GIVING:
        return GiveResult(status, 0, "", int(res[1]))
    return GiveResult(status, 0, "", 0)


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
    PROMISED = 3


class ReturnUnits(IntEnum):
    """lua/return_units.lua's result."""

    UNKNOWN_SALE = -1
    ALREADY_RETURNED = 0
    RETURNED = 1


class SaleLoad(IntEnum):
    """lua/sale_load.lua's status, in place of ``{remaining, allotment}``."""

    CLOSED = -1


class SaleLoadResult(NamedTuple):
    """lua/sale_load.lua's reply by name."""

    closed: bool  # SaleLoad.CLOSED: the sale is closed (and the allotment grew)
    remaining: int  # units left in the bucket (0 when closed)


def parse_sale_load(res: Sequence[Any]) -> SaleLoadResult:
    first = int(res[0])
    if first == SaleLoad.CLOSED:
        return SaleLoadResult(True, 0)
    return SaleLoadResult(False, first)


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


class QueueEnterResult(NamedTuple):
    """lua/queue_enter.lua's reply by name."""

    status: QueueEnter
    kind: str  # ENTERED, ALREADY_IN: the entry's kind (its ticket says it)
    position: int  # ENTERED, ALREADY_IN
    entered_ms: int  # ENTERED, ALREADY_IN
    opens_ms: int  # NOT_OPEN: when the waiting room opens


def parse_queue_enter(res: Sequence[Any]) -> QueueEnterResult:
    status = QueueEnter(int(res[0]))
    if status is QueueEnter.ENTERED or status is QueueEnter.ALREADY_IN:
        return QueueEnterResult(status, _text(res[1]), int(res[2]), int(res[3]), 0)
    if status is QueueEnter.NOT_OPEN:
        return QueueEnterResult(status, "", 0, 0, int(res[1]))
    return QueueEnterResult(status, "", 0, 0, 0)


class QueueAdmit(IntEnum):
    """lua/queue_admit.lua's status codes."""

    ADMITTED = 0
    IDLE = 1
    SOLD_OUT = 2
    NOT_STARTED = 3
    ENDED = 4
    UNKNOWN_SALE = 5
    RECOVERING = 6


class QueueAdmitResult(NamedTuple):
    """lua/queue_admit.lua's reply by name (a step that ran: ADMITTED, IDLE, SOLD_OUT)."""

    status: QueueAdmit
    ran: bool  # False: refused before the step (not started, ended, unknown, recovering)
    abandoned: int  # outstanding admissions whose window passed in this step
    waits_ms: tuple[int, ...]  # ADMITTED: how long each one admitted waited since entering


def parse_queue_admit(res: Sequence[Any]) -> QueueAdmitResult:
    status = QueueAdmit(int(res[0]))
    if len(res) < 6:
        return QueueAdmitResult(status, False, 0, ())
    waits = tuple(int(w) for w in res[6:]) if status is QueueAdmit.ADMITTED else ()
    return QueueAdmitResult(status, True, int(res[2]), waits)


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
