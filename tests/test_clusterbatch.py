"""The join path's pipelined connection on a real valkey cluster: routed by slot with each
primary's run id, a moved slot followed (MOVED), a slot being migrated followed once
(ASK, with ASKING), one WAIT per batch and not one per call."""

from __future__ import annotations

import asyncio
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from flashsale.settings import Settings
from flashsale.stores import rediskeys
from flashsale.stores.clusterbatch import ClusterScriptBatcher, NoOwner
from flashsale.stores.redisbatch import NotSent, OutcomeUnknown, run_id_of
from flashsale.stores.redisclient import open_redis
from stack.embedded import ValkeyCluster, redis_command, start_redis_cluster

pytestmark = [pytest.mark.integration]

ECHO = "redis.call('INCR', KEYS[1]) return {KEYS[1], ARGV[1], ARGV[#ARGV]}"


@pytest.fixture
async def cluster() -> AsyncIterator[ValkeyCluster]:
    root = Path(tempfile.mkdtemp(prefix="flashsale-cbatch-"))
    started = start_redis_cluster(root, persist=False)
    yield started
    started.stop()
    shutil.rmtree(root, ignore_errors=True)


def _run_id(cluster: ValkeyCluster, port: int) -> str:
    return run_id_of(redis_command(port, cluster.password, "INFO", "server"))


def _stat(cluster: ValkeyCluster, port: int, command: str) -> int:
    info = redis_command(port, cluster.password, "INFO", "commandstats").decode()
    for line in info.splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


async def _client(cluster: ValkeyCluster) -> Redis:
    return open_redis(Settings(redis_url=cluster.url, redis_cluster=True))


async def test_calls_are_routed_by_slot_with_each_primarys_run_id(
    cluster: ValkeyCluster,
) -> None:
    client = await _client(cluster)
    script = client.register_script(ECHO)
    await client.script_load(script.script)
    batcher = ClusterScriptBatcher(cluster.url.split(","))
    try:
        await batcher.connect()
        keys = [rediskeys.sale(i) for i in range(30)]
        replies = await asyncio.gather(
            *(batcher.call(script, [k], [i], with_run_id=True) for i, k in enumerate(keys))
        )
        owners = {cluster.primary_for(k).port for k in keys}
        assert len(owners) == 3  # thirty sales land on every primary
        for i, (key, reply) in enumerate(zip(keys, replies, strict=True)):
            assert reply[0].decode() == key and int(reply[1]) == i
            assert reply[2].decode() == _run_id(cluster, cluster.primary_for(key).port)
        assert batcher.round_trips == 3  # one write per primary for the whole tick
    finally:
        await batcher.close()
        await client.aclose()


async def test_a_moved_slot_is_followed(cluster: ValkeyCluster) -> None:
    client = await _client(cluster)
    script = client.register_script(ECHO)
    await client.script_load(script.script)
    batcher = ClusterScriptBatcher(cluster.url.split(","))
    key = rediskeys.sale(7)
    try:
        await batcher.connect()
        old = cluster.primary_for(key)
        new = next(
            n
            for n in cluster.nodes
            if n.port != old.port and b"role:master" in _replication(cluster, n.port)
        )
        new_id = redis_command(new.port, cluster.password, "CLUSTER", "MYID").decode()
        slot = int(redis_command(old.port, cluster.password, "CLUSTER", "KEYSLOT", key))
        old_id = redis_command(old.port, cluster.password, "CLUSTER", "MYID").decode()
        # the slot is empty: migrate it to another primary as a resharding does (the
        # importing node takes it with a new config epoch, then everyone is told)
        pw = cluster.password
        redis_command(new.port, pw, "CLUSTER", "SETSLOT", slot, "IMPORTING", old_id)
        redis_command(old.port, pw, "CLUSTER", "SETSLOT", slot, "MIGRATING", new_id)
        redis_command(new.port, pw, "CLUSTER", "SETSLOT", slot, "NODE", new_id)
        redis_command(old.port, pw, "CLUSTER", "SETSLOT", slot, "NODE", new_id)
        for node in cluster.nodes:
            if node.port not in (old.port, new.port) and b"role:master" in _replication(
                cluster, node.port
            ):
                redis_command(node.port, pw, "CLUSTER", "SETSLOT", slot, "NODE", new_id)
        refreshes = batcher.refreshes
        reply: Any = await batcher.call(script, [key], ["x"], with_run_id=True)
        assert reply[2].decode() == _run_id(cluster, new.port)
        assert batcher.node_for(key).endswith(f":{new.port}")
        assert await client.get(key) == b"1"  # ran once, on the new owner
        # a MOVED says the map is out of date: the whole of it is read again, in the background
        deadline = time.monotonic() + 30  # a bound on a failure, not a figure of speed
        while batcher.refreshes == refreshes:
            assert time.monotonic() < deadline, "the map was not read again after a MOVED"
            await asyncio.sleep(0.05)
        assert batcher.refreshes == refreshes + 1
    finally:
        await batcher.close()
        await client.aclose()


async def test_a_slot_being_migrated_is_asked_for_once(cluster: ValkeyCluster) -> None:
    """Mid-migration the old owner answers ASK for a key it no longer has: the call is sent
    once to the importing node with ASKING and runs there; the slot map is not changed
    (the slot still belongs to the old owner until the migration ends)."""
    client = await _client(cluster)
    script = client.register_script(ECHO)
    await client.script_load(script.script)
    batcher = ClusterScriptBatcher(cluster.url.split(","))
    key = rediskeys.sale(11)
    pw = cluster.password
    try:
        await batcher.connect()
        old = cluster.primary_for(key)
        new = next(
            n
            for n in cluster.nodes
            if n.port != old.port and b"role:master" in _replication(cluster, n.port)
        )
        new_id = redis_command(new.port, pw, "CLUSTER", "MYID").decode()
        old_id = redis_command(old.port, pw, "CLUSTER", "MYID").decode()
        slot = int(redis_command(old.port, pw, "CLUSTER", "KEYSLOT", key))
        redis_command(new.port, pw, "CLUSTER", "SETSLOT", slot, "IMPORTING", old_id)
        redis_command(old.port, pw, "CLUSTER", "SETSLOT", slot, "MIGRATING", new_id)
        asked = _stat(cluster, new.port, "asking")
        reply: Any = await batcher.call(script, [key], ["y"], with_run_id=True)
        assert reply[2].decode() == _run_id(cluster, new.port)  # ran on the importing node
        assert _stat(cluster, new.port, "asking") == asked + 1
        assert batcher.node_for(key).endswith(f":{old.port}")  # an ASK moves nothing
        for node in cluster.nodes:  # end the migration, then read the key where it lives
            if b"role:master" in _replication(cluster, node.port):
                redis_command(node.port, pw, "CLUSTER", "SETSLOT", slot, "NODE", new_id)
        await asyncio.sleep(0.2)
        assert await client.get(key) == b"1"  # ran once
    finally:
        await batcher.close()
        await client.aclose()


def _replication(cluster: ValkeyCluster, port: int) -> bytes:
    reply: bytes = redis_command(port, cluster.password, "INFO", "replication")
    return reply


async def test_one_wait_per_batch_not_per_call(cluster: ValkeyCluster) -> None:
    client = await _client(cluster)
    script = client.register_script(ECHO)
    await client.script_load(script.script)
    batcher = ClusterScriptBatcher(cluster.url.split(","), wait_replicas=1)
    key = rediskeys.sale(11)
    port = cluster.primary_for(key).port
    try:
        await batcher.connect()
        waits = _stat(cluster, port, "wait")
        for _ in range(3):  # three ticks, 200 calls each, all on one primary
            await asyncio.gather(*(batcher.call(script, [key], [i]) for i in range(200)))
        batches = batcher.round_trips
        assert batches <= 6  # MAX_BATCH 512: one write per tick
        assert _stat(cluster, port, "wait") - waits == batches
        assert await client.get(key) == b"600"
    finally:
        await batcher.close()
        await client.aclose()


async def test_a_script_not_loaded_is_answered_after_its_own_wait(cluster: ValkeyCluster) -> None:
    """NOSCRIPT (a restarted or promoted node) is retried with EVAL and its own WAIT: the
    batch's first WAIT, which answers before the retried call has a reply, must not settle
    it: settled with None, the join that met the empty script cache would answer 500."""
    client = await _client(cluster)
    script = client.register_script(ECHO + " -- not loaded anywhere yet")
    batcher = ClusterScriptBatcher(cluster.url.split(","), wait_replicas=1)
    key = rediskeys.sale(12)
    try:
        await batcher.connect()
        replies = await asyncio.gather(*(batcher.call(script, [key], [i]) for i in range(5)))
        assert [int(r[1]) for r in replies] == list(range(5))
        assert await client.get(key) == b"5"
    finally:
        await batcher.close()
        await client.aclose()


def _role(cluster: ValkeyCluster, role: bytes) -> list[int]:
    return [n.port for n in cluster.nodes if b"role:" + role in _replication(cluster, n.port)]


async def test_a_seed_that_is_down_answers_not_sent_then_a_refresh_once_it_is_back(
    cluster: ValkeyCluster,
) -> None:
    """The only seed is down: every call fails as not sent (the join answers 503), never
    an error of a map left empty; once the seed answers, the next call reads the map and
    runs, and the batcher knows every node for the next refresh."""
    client = await _client(cluster)
    script = client.register_script(ECHO)
    await client.script_load(script.script)
    seed = cluster.node(_role(cluster, b"slave")[0])  # killing a replica moves no slot
    seed.proc.send_signal(signal.SIGKILL)
    seed.proc.wait(10)
    batcher = ClusterScriptBatcher([seed.url])
    key = rediskeys.sale(21)
    try:
        failed = await asyncio.gather(
            *(batcher.call(script, [key], [i]) for i in range(20)), return_exceptions=True
        )
        assert all(isinstance(e, NotSent) for e in failed), failed
        assert any(isinstance(e, NoOwner) for e in failed), failed
        assert batcher.refreshes == 0
        with pytest.raises(NoOwner):
            batcher.node_for(key)
        cluster.restart(seed)
        await asyncio.to_thread(cluster.wait_healthy)
        reply: Any = await batcher.call(script, [key], ["back"])
        assert reply[1] == b"back"
        assert batcher.refreshes == 1
        assert await client.get(key) == b"1"  # none of the failed calls ran
        primaries = {f"127.0.0.1:{port}" for port in _role(cluster, b"master")}
        assert primaries < set(batcher.known_nodes)  # and the seed, and replicas listed
    finally:
        await batcher.close()
        await client.aclose()


async def test_the_seed_primary_killed_the_map_comes_from_the_other_nodes(
    cluster: ValkeyCluster,
) -> None:
    """Configured with one node, the primary of the key, which is then SIGKILLed: the
    batcher reads the map from the nodes it learned of, and once the replica is promoted
    the calls run there."""
    client = await _client(cluster)
    script = client.register_script(ECHO)
    await client.script_load(script.script)
    key = rediskeys.sale(22)
    seed = cluster.primary_for(key)
    batcher = ClusterScriptBatcher([seed.url])
    try:
        await batcher.call(script, [key], ["before"])
        refreshes = batcher.refreshes
        assert refreshes == 1
        seed.proc.send_signal(signal.SIGKILL)
        seed.proc.wait(10)
        failures: list[BaseException] = []
        deadline = time.monotonic() + 60  # a bound on a failure, not a figure of speed
        while True:
            try:
                reply: Any = await batcher.call(script, [key], ["after"], with_run_id=True)
                break
            except (NotSent, OutcomeUnknown) as exc:
                failures.append(exc)
                assert time.monotonic() < deadline, f"no call ran after the kill: {failures[-3:]}"
                await asyncio.sleep(0.1)
        # the node primary_for asks may learn of the promotion by gossip after the batcher,
        # which asked the promoted replica itself: wait for the cluster's own word
        settled = time.monotonic() + 30
        while (promoted := cluster.primary_for(key)).port == seed.port:
            assert time.monotonic() < settled, "the cluster never named a new primary"
            await asyncio.sleep(0.1)
        assert reply[2].decode() == _run_id(cluster, promoted.port)
        assert batcher.node_for(key) == f"127.0.0.1:{promoted.port}"
        assert batcher.refreshes > refreshes  # the map was read again, from another node
        assert all(not isinstance(e, NoOwner) for e in failures)  # the old map was kept whole
    finally:
        await batcher.close()
        await client.aclose()
