from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from flashsale.ids import MachineLease, OrderIdGenerator


@pytest.mark.unit
def test_ids_unique_and_increasing() -> None:
    gen = OrderIdGenerator(7)
    ids = [gen.next(123456) for _ in range(50_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == 25 for i in ids)
    assert ids[0][15:18] == "007" and ids[0][18:21] == "456"


@pytest.mark.unit
def test_clock_step_back_stays_monotonic(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = OrderIdGenerator(1)
    now = [1_800_000_000_000_000_000]
    monkeypatch.setattr("flashsale.ids.time.time_ns", lambda: now[0])
    a = gen.next(1)
    now[0] -= 5_000_000_000  # five seconds back
    b = gen.next(1)
    assert b > a


@pytest.mark.integration
async def test_two_live_processes_never_share_a_machine_id(redis: Redis) -> None:
    leases = [MachineLease(redis) for _ in range(20)]
    ids = await asyncio.gather(*(lease.acquire() for lease in leases))
    assert len(set(ids)) == 20
    for lease in leases:
        await lease.release()
