"""The join path's lean Redis connection against a real valkey: NOSCRIPT reload, a server
that is paused or killed with a call in flight (outcome unknown), one that is down before
the call (not sent), and the run id that fences sales across restarts."""

from __future__ import annotations

import asyncio
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from flashsale.stores.redisbatch import NotSent, OutcomeUnknown, ScriptBatcher
from stack.embedded import Server, start_redis

pytestmark = [pytest.mark.integration]

ECHO = "return {KEYS[1], ARGV[1], ARGV[#ARGV]}"
BUSY = """
local t = redis.call('TIME')
local start = tonumber(t[1]) * 1000000 + tonumber(t[2])
while true do
  t = redis.call('TIME')
  if tonumber(t[1]) * 1000000 + tonumber(t[2]) - start > 700000 then break end
end
return 1
"""


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    root = Path(tempfile.mkdtemp(prefix="flashsale-batch-"))
    srv = start_redis(root / "r", persist=False)
    yield srv
    srv.proc.send_signal(signal.SIGCONT)
    srv.stop()
    shutil.rmtree(root, ignore_errors=True)


async def _script(url: str, source: str) -> tuple[Redis, AsyncScript]:
    client: Redis = Redis.from_url(url)
    return client, client.register_script(source)


async def test_script_flush_then_call_reloads_the_script(server: Server) -> None:
    client, echo = await _script(server.url, ECHO)
    batcher = ScriptBatcher(server.url)
    try:
        assert await batcher.call(echo, ["k"], ["a"]) == [b"k", b"a", b"a"]
        await client.script_flush()
        assert await batcher.call(echo, ["k"], ["b"]) == [b"k", b"b", b"b"]
        assert await batcher.call(echo, ["k"], ["c"]) == [b"k", b"c", b"c"]
    finally:
        await batcher.close()
        await client.aclose()


async def test_run_id_is_passed_and_changes_with_a_restart(server: Server) -> None:
    client, echo = await _script(server.url, ECHO)
    batcher = ScriptBatcher(server.url, timeout_s=2)
    try:
        reply = await batcher.call(echo, ["k"], ["a"], with_run_id=True)
        first = batcher.run_id
        assert len(first) == 40 and reply[2] == first.encode()
        server.stop()
        with pytest.raises((NotSent, OutcomeUnknown)):
            await batcher.call(echo, ["k"], ["a"], with_run_id=True)
        assert server.log_path is not None  # the same folder: the same password
        again = start_redis(server.log_path.parent, port=server.port, persist=False)
        try:
            reply = await batcher.call(echo, ["k"], ["a"], with_run_id=True)
            assert batcher.run_id != first and reply[2] == batcher.run_id.encode()
        finally:
            again.stop()
    finally:
        await batcher.close()
        await client.aclose()


async def test_paused_server_gives_outcome_unknown(server: Server) -> None:
    client, echo = await _script(server.url, ECHO)
    batcher = ScriptBatcher(server.url, timeout_s=0.5)
    try:
        await batcher.connect()
        server.proc.send_signal(signal.SIGSTOP)
        with pytest.raises(OutcomeUnknown):
            await batcher.call(echo, ["k"], ["a"])
        server.proc.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.2)  # the late reply is matched to the expired call and dropped
        assert await batcher.call(echo, ["k"], ["z"]) == [b"k", b"z", b"z"]
    finally:
        await batcher.close()
        await client.aclose()


async def test_server_killed_with_a_call_in_flight_gives_outcome_unknown(
    server: Server,
) -> None:
    client, busy = await _script(server.url, BUSY)
    batcher = ScriptBatcher(server.url, timeout_s=5)
    try:
        await batcher.connect()
        call = asyncio.create_task(batcher.call(busy, ["k"], []))
        await asyncio.sleep(0.2)  # the script is running on the server
        server.proc.send_signal(signal.SIGKILL)
        with pytest.raises(OutcomeUnknown):
            await call
    finally:
        await batcher.close()
        await client.aclose()


async def test_server_down_before_the_call_is_not_sent(server: Server) -> None:
    client, echo = await _script(server.url, ECHO)
    await client.aclose()
    server.stop()
    batcher = ScriptBatcher(server.url, timeout_s=1)
    try:
        with pytest.raises(NotSent):
            await batcher.call(echo, ["k"], ["a"])
    finally:
        await batcher.close()
