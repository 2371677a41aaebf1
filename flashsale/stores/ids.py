"""Order ids without a central counter, and the machine id that keeps them unique.

An id is 25 decimal digits: UTC time to the millisecond (yyMMddHHmmssSSS), the
machine id (3 digits), the user id mod 1000 (3 digits) and a per-millisecond
sequence (4 digits), as in seed 002. Ids from one generator increase strictly,
even if the wall clock steps back. The machine id comes from settings or from a
lease in Redis that the process renews; two live processes never hold the same one.

Where replicas are awaited (``FLASHSALE_REDIS_WAIT_REPLICAS``), the lease is taken and
renewed through the join path's pipelined connection, whose batches end with ``WAIT``:
an id is used only once a replica holds its lease, so a failover to that replica cannot
hand the same id to a second process. A lease whose replication was not confirmed is
not used (the next free id is tried; an unconfirmed renewal is retried).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from redis.asyncio import Redis
from redis.exceptions import RedisError

from flashsale.stores import rediskeys, tasks
from flashsale.stores.redisbatch import OutcomeUnknown
from flashsale.stores.scripts import Lease, register
from flashsale.timing import MACHINE_LEASE_RENEW_S, MACHINE_LEASE_TTL_MS

if TYPE_CHECKING:
    from flashsale.stores.clusterbatch import ClusterScriptBatcher
    from flashsale.stores.redisbatch import ScriptBatcher

log = logging.getLogger(__name__)

MACHINE_IDS = 1000
_SEQ_MAX = 9999


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class OrderIdGenerator:
    """Strictly increasing order ids for one machine id."""

    def __init__(self, machine_id: int, *, last_ms: int = 0) -> None:
        if not 0 <= machine_id < MACHINE_IDS:
            raise ValueError("machine id must be in [0, 999]")
        self.machine_id = machine_id
        self._last_ms = last_ms
        self._seq = 0
        self._prefix_second = -1
        self._prefix = ""

    @property
    def last_ms(self) -> int:
        return self._last_ms

    def next(self, user_id: int) -> str:
        now_ms = time.time_ns() // 1_000_000
        if now_ms <= self._last_ms:
            now_ms = self._last_ms  # same millisecond, or the clock stepped back
            self._seq += 1
            if self._seq > _SEQ_MAX:
                now_ms += 1
                self._seq = 0
        else:
            self._seq = 0
        self._last_ms = now_ms
        second = now_ms // 1000
        if second != self._prefix_second:
            self._prefix_second = second
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%y%m%d%H%M%S")
        return (
            f"{self._prefix}{now_ms % 1000:03d}{self.machine_id:03d}"
            f"{user_id % 1000:03d}{self._seq:04d}"
        )


class MachineLease:
    """Holds ``fs:machine:<n>`` in Redis for as long as the process lives."""

    def __init__(
        self, redis: Redis, batcher: ScriptBatcher | ClusterScriptBatcher | None = None
    ) -> None:
        self._redis = redis
        self._batcher = batcher  # replies only once a replica has the write (WAIT)
        self._script = register(redis, "machine_lease")
        self._token = f"{os.getpid()}:{secrets.token_hex(8)}"
        self.machine_id: int | None = None
        self._task: asyncio.Task[None] | None = None
        self.generator: OrderIdGenerator | None = None

    async def _lease(self, n: int) -> Lease | None:
        """Take or renew ``fs:machine:<n>``; None when its replication was not confirmed."""
        keys: list[str] = [rediskeys.machine(n)]
        args: list[str | int] = [self._token, MACHINE_LEASE_TTL_MS]
        if self._batcher is None:
            return Lease(int(await self._script(keys=keys, args=args)))
        try:
            return Lease(int(await self._batcher.call(self._script, keys, args)))
        except OutcomeUnknown:
            return None

    async def _claim_free_id(self) -> int:
        start = random.randrange(MACHINE_IDS)
        for i in range(MACHINE_IDS):
            n = (start + i) % MACHINE_IDS
            if await self._lease(n) is Lease.HELD:
                return n
        raise RuntimeError("no free machine id: 1000 live processes hold one each")

    async def acquire(self) -> int:
        n = await self._claim_free_id()
        self.machine_id = n
        self.generator = OrderIdGenerator(n)
        self._task = asyncio.create_task(self._renew_forever(), name="machine-lease")
        return n

    async def _renew_forever(self) -> None:
        await tasks.guarded_loop(
            self._renew,
            name="machine-id lease renewal",
            every_s=MACHINE_LEASE_RENEW_S,
            wait_first=True,
        )

    async def _renew(self) -> None:
        assert self.machine_id is not None and self.generator is not None
        held = await self._lease(self.machine_id)
        if held is None:
            log.warning(
                "machine-id lease %d renewed without a replica's confirmation; will retry",
                self.machine_id,
            )
            return
        if held is Lease.HELD:
            return
        # expired and taken over while we could not reach Redis: take another id,
        # and keep ids increasing across the switch
        log.error("machine id %d was taken by another process", self.machine_id)
        n = await self._claim_free_id()
        last_ms = self.generator.last_ms
        self.machine_id = n
        self.generator = OrderIdGenerator(n, last_ms=last_ms)

    async def release(self) -> None:
        if self._task is not None:
            await tasks.stop(self._task)
            self._task = None
        if self._batcher is not None:
            await self._batcher.close()
        if self.machine_id is not None:
            with contextlib.suppress(RedisError):
                current = await self._redis.get(rediskeys.machine(self.machine_id))
                if current is not None and _text(current) == self._token:
                    await self._redis.delete(rediskeys.machine(self.machine_id))


class OrderIds:
    """What handlers use: ``app[ORDER_IDS].next(user_id)``."""

    def __init__(self, lease: MachineLease | None, fixed: OrderIdGenerator | None = None) -> None:
        self._lease = lease
        self._fixed = fixed

    @property
    def machine_id(self) -> int:
        gen = self._generator()
        return gen.machine_id

    def _generator(self) -> OrderIdGenerator:
        if self._fixed is not None:
            return self._fixed
        assert self._lease is not None and self._lease.generator is not None
        return self._lease.generator

    def next(self, user_id: int) -> str:
        return self._generator().next(user_id)
