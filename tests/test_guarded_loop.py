"""The one background loop (``flashsale/stores/tasks.py``): it lives through a lost Redis
connection, waits its interval after a failure, and ends on the first cancel; the redis-py
bug it works around (redis/redis-py#4287) still reproduces against a real valkey; and a
no-I/O timer on it (the CPU sample) keeps its first wait."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import Connection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from flashsale.settings import Settings
from flashsale.stores import tasks
from flashsale.stores.redisclient import lost_connection
from stack.embedded import free_port

LONG_S = 3600.0  # an interval no test waits out: a second step proves a wait ended early
HANG_GUARD_S = 10.0  # only against a hang; every wait below ends in microseconds


async def _turns(n: int = 50) -> None:
    """Give every other task ``n`` turns of the event loop."""
    for _ in range(n):
        await asyncio.sleep(0)


async def _ended(task: asyncio.Task[Any]) -> None:
    await asyncio.wait({task}, timeout=HANG_GUARD_S)
    assert task.done(), "the loop did not end"


async def _write_under_a_disconnect(settings: Settings) -> None:
    """A command written while another task closes its connection, as a cluster failover
    does. On Python 3.11 ``wait_for`` runs the write in a task of its own, so the close
    lands between redis-py's "is it connected" and its write."""
    url = parse_url(settings.redis)
    conn = Connection(
        host=url.get("host", "127.0.0.1"),
        port=url.get("port", 6379),
        password=url.get("password"),
        socket_timeout=5,
    )
    await conn.connect()  # type: ignore[no-untyped-call]
    try:
        sending = asyncio.create_task(conn.send_command("PING"))
        await asyncio.sleep(0)  # the write is scheduled, not yet run
        await conn.disconnect(nowait=True)
        await sending
    finally:
        await conn.disconnect()


@pytest.mark.integration
async def test_redis_py_4287_still_leaks_a_transport_error(base_settings: Settings) -> None:
    """Fails once redis-py ships its fix (redis/redis-py#4287, #4288): then remove the
    workaround, ``leaks_as_connection_errors`` and the traceback check in
    ``lost_connection`` (flashsale/stores/redisclient.py), and this test."""
    fixed = (
        "redis-py no longer leaks a transport error for a write on a closed connection: "
        "redis/redis-py#4287 is fixed; remove leaks_as_connection_errors, the traceback "
        "check in lost_connection and this test"
    )
    try:
        await _write_under_a_disconnect(base_settings)
    except RedisError as exc:
        raise AssertionError(f"{fixed} (it raised {exc!r})") from exc
    except (AttributeError, TypeError, RuntimeError):
        return  # the bug, still there: the workaround is still needed
    raise AssertionError(f"{fixed} (the write went through)")


@pytest.mark.integration
async def test_the_loop_lives_through_a_lost_connection(base_settings: Settings) -> None:
    calls = 0
    second = asyncio.Event()

    async def step() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await _write_under_a_disconnect(base_settings)  # the leak, not a RedisError
        else:
            second.set()

    task = asyncio.create_task(tasks.guarded_loop(step, name="test", every_s=0))
    try:
        await asyncio.wait_for(second.wait(), HANG_GUARD_S)
        assert not task.done()
    finally:
        await tasks.stop(task)
    assert task.cancelled() and calls >= 2


@pytest.mark.unit
async def test_after_a_failure_the_loop_waits_before_trying_again() -> None:
    calls = 0
    wake = asyncio.Event()

    async def failing() -> None:
        nonlocal calls
        calls += 1
        raise RedisConnectionError("the store is out of reach")

    task = asyncio.create_task(tasks.guarded_loop(failing, name="test", every_s=LONG_S, wake=wake))
    await _turns()
    assert calls == 1 and not task.done()  # waiting out its interval, not spinning
    wake.set()  # the interval is over
    await _turns()
    assert calls == 2 and not task.done()
    task.cancel()
    await _ended(task)
    assert task.cancelled()


@pytest.mark.unit
@pytest.mark.parametrize("comes_out_as", ["nothing", "a store error"])
async def test_a_cancel_lost_inside_the_step_still_ends_the_loop(comes_out_as: str) -> None:
    """What redis-py did with a cancel that landed mid-pipeline: the step returned as if
    nothing happened, or raised its connection error. The loop asks, and ends on that one
    cancel."""
    entered = asyncio.Event()

    async def careless() -> None:
        entered.set()
        try:
            await asyncio.sleep(LONG_S)
        except asyncio.CancelledError:
            if comes_out_as == "a store error":
                raise RedisConnectionError("closed while cancelling") from None

    task = asyncio.create_task(tasks.guarded_loop(careless, name="test", every_s=LONG_S))
    await entered.wait()
    task.cancel()
    await _ended(task)
    assert task.cancelled()


@pytest.mark.unit
async def test_a_bug_ends_the_loop_and_stop_ends_it_quietly() -> None:
    async def buggy() -> None:
        raise ValueError("a bug of ours")

    task = asyncio.create_task(tasks.guarded_loop(buggy, name="test", every_s=LONG_S))
    await _ended(task)
    assert isinstance(task.exception(), ValueError)

    calls = 0
    stop = asyncio.Event()

    async def step() -> None:
        nonlocal calls
        calls += 1

    loop = tasks.guarded_loop(step, name="test", every_s=LONG_S, wait_first=True, stop=stop)
    task = asyncio.create_task(loop)
    await _turns()
    assert calls == 0  # waits first
    stop.set()
    await _ended(task)
    assert task.result() is None and calls == 0


@pytest.mark.unit
async def test_the_cpu_sample_waits_its_interval_then_samples(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gateway import plans_runtime

    cpu = [-1.0]
    monkeypatch.setattr(plans_runtime, "CPU_SAMPLE_S", LONG_S)
    task = asyncio.create_task(plans_runtime._sample_cpu(cpu))
    await _turns()
    assert cpu == [-1.0]  # no sample before a whole interval
    task.cancel()
    await _ended(task)
    assert task.cancelled()

    monkeypatch.setattr(plans_runtime, "CPU_SAMPLE_S", 0.0)
    task = asyncio.create_task(plans_runtime._sample_cpu(cpu))
    await _turns()
    assert cpu[0] >= 0.0
    task.cancel()
    await _ended(task)
    assert task.cancelled()


async def test_a_cluster_client_that_reaches_no_node_is_a_lost_store() -> None:
    """redis-py's cluster client that can reach none of its nodes (every host on the far
    side of a partition) raises RedisClusterException, which is not a RedisError: a loop
    lives through it, and a request is told 503 (``lost_connection``), not 500."""
    seed = ClusterNode("127.0.0.1", free_port())  # nothing listens there
    client = RedisCluster(startup_nodes=[seed], socket_connect_timeout=1)
    seen: list[BaseException] = []
    failed = asyncio.Event()

    async def step() -> None:
        try:
            await client.smembers("fs:sales")
        except Exception as exc:
            seen.append(exc)
            failed.set()
            raise

    wake = asyncio.Event()
    task = asyncio.create_task(tasks.guarded_loop(step, name="test", every_s=LONG_S, wake=wake))
    try:
        for _ in range(2):  # a round fails, the loop waits out its interval, a round again
            await asyncio.wait_for(failed.wait(), 30)
            failed.clear()
            await _turns()
            assert not task.done(), task
            wake.set()
        assert [type(e).__name__ for e in seen] == ["RedisClusterException"] * 2
        assert lost_connection(seen[0])
    finally:
        task.cancel()
        await _ended(task)
        await client.aclose()
