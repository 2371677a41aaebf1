from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime

import pytest
from redis.asyncio import Redis

from flashsale.flash.cache import iso_ms
from flashsale.flash.runtime import open_batcher
from flashsale.settings import Settings
from flashsale.stores.ids import MachineLease, OrderIdGenerator
from flashsale.stores.redisclient import open_redis
from flashsale.stores.rediskeys import machine
from stack.embedded import ValkeyCluster, redis_command


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
    monkeypatch.setattr("flashsale.stores.ids.time.time_ns", lambda: now[0])
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


@pytest.mark.integration
async def test_on_a_cluster_a_lease_is_used_only_once_a_replica_has_it(
    valkey_cluster: ValkeyCluster,
) -> None:
    """With replicas awaited, the lease goes through the pipelined connection whose batch
    ends with WAIT: by the time an id is used, the replica that a failover would promote
    holds its lease, so no second process can take the same id from it."""
    settings = Settings(redis_url=valkey_cluster.url, redis_cluster=True, redis_wait_replicas=1)
    redis = open_redis(settings)
    lease = MachineLease(redis, open_batcher(settings))
    try:
        waits = _waits(valkey_cluster)
        n = await lease.acquire()
        assert _waits(valkey_cluster) > waits  # the lease's batch ended with WAIT
        primary = valkey_cluster.primary_for(machine(n))
        replica = next(
            node
            for node in valkey_cluster.nodes
            if f"master_port:{primary.port}".encode()
            in redis_command(node.port, valkey_cluster.password, "INFO", "replication")
        )
        found = redis_command(
            replica.port, valkey_cluster.password, "SCAN", 0, "MATCH", machine(n), "COUNT", 1000
        )
        # the key is on the replica already, not only on the primary
        assert machine(n).encode() in found[1], found
        other = MachineLease(redis)
        assert await other.acquire() != n
        await other.release()
    finally:
        await lease.release()
        await redis.aclose()


def _waits(cluster: ValkeyCluster) -> int:
    """WAIT calls served by every node of ``cluster`` so far."""
    total = 0
    for node in cluster.nodes:
        info = redis_command(node.port, cluster.password, "INFO", "commandstats").decode()
        for line in info.splitlines():
            if line.startswith("cmdstat_wait:"):
                total += int(line.split("calls=")[1].split(",")[0])
    return total


@pytest.mark.unit
def test_iso_ms_spells_what_datetime_spells() -> None:
    """The deadline every accepted join answers is formatted from a per-second cache; it
    must read exactly as ``datetime.isoformat`` writes it, across second boundaries."""
    rng = random.Random(7)
    samples = [0, 999, 1000, 1_765_000_000_000, 1_765_000_000_001, 1_765_000_000_999]
    samples += [rng.randrange(0, 4_000_000_000_000) for _ in range(5_000)]
    samples += list(range(1_765_000_000_990, 1_765_000_001_010))  # one boundary, in order
    for ms in samples:
        expected = datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")
        assert iso_ms(ms) == expected, ms
