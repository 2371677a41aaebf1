"""Auto-pipelining for the join hot path: one connection, one write per event-loop tick.

A stampede puts hundreds of joins in flight per worker. redis-py spends tens of
microseconds of Python per command (packing, the pipeline object, response callbacks),
which caps one process far below what Redis can do. Here every script call queued
during one tick is packed into one buffer, written with one syscall on one connection,
and the replies (parsed by hiredis, in C) are matched to the callers in order. Each
attempt still costs exactly one script execution and shares one round trip with its
neighbours, so the one-round-trip-per-attempt promise holds.

A reply of NOSCRIPT (Redis restarted or flushed its scripts) is retried with EVAL and
the script's source; a lost connection fails the calls in flight, and the next call
connects again; a batch that gets no reply within ``timeout_s`` fails with TimeoutError.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Any, Final, cast
from urllib.parse import unquote, urlsplit

import hiredis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

MAX_BATCH: Final = 512
DEFAULT_TIMEOUT_S: Final = 5.0


def pack(args: Sequence[Any]) -> bytes:
    """One command in RESP."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        else:
            data = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Call:
    __slots__ = ("args", "fut", "script")

    def __init__(self, script: AsyncScript, args: list[Any], fut: asyncio.Future[Any]) -> None:
        self.script = script
        self.args = args
        self.fut = fut


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: ScriptBatcher) -> None:
        self._owner = owner
        self._reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, so no isinstance check
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        owner = self._owner
        while True:
            reply = self._reader.gets()
            if reply is False:
                return
            owner._reply(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._lost(exc)


class ScriptBatcher:
    """Queue script calls; flush each tick's calls as one write on one connection."""

    def __init__(
        self, url: str, *, max_batch: int = MAX_BATCH, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise ValueError("the join path supports redis:// URLs")
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._db = int(parts.path.lstrip("/") or 0)
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        self._max_batch = max_batch
        self._timeout_s = timeout_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._buffer: list[bytes] = []
        self._queued: list[_Call | None] = []  # None: a reply we skip (AUTH, SELECT)
        self._inflight: collections.deque[_Call | None] = collections.deque()
        self._scheduled = False
        self.round_trips = 0  # writes carrying at least one script call
        self.calls = 0  # script calls carried

    async def _connect(self) -> _Protocol:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._protocol is not None:
                return self._protocol
            loop = asyncio.get_running_loop()
            try:
                _, protocol = await asyncio.wait_for(
                    loop.create_connection(lambda: _Protocol(self), self._host, self._port),
                    self._timeout_s,
                )
            except (OSError, TimeoutError) as exc:
                raise RedisConnectionError(f"cannot reach Redis: {exc}") from exc
            self._protocol = protocol
            if self._password is not None:
                auth = [self._username, self._password] if self._username else [self._password]
                self._buffer.append(pack(["AUTH", *auth]))
                self._queued.append(None)
            if self._db:
                self._buffer.append(pack(["SELECT", self._db]))
                self._queued.append(None)
            return protocol

    async def call(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA ``script`` (connecting first if needed) and return its reply."""
        if self._protocol is None:
            await self._connect()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        command = ["EVALSHA", script.sha, len(keys), *keys, *args]
        self._buffer.append(pack(command))
        self._queued.append(_Call(script, command, fut))
        self.calls += 1
        if len(self._queued) >= self._max_batch:
            self._flush()
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await fut

    def _flush(self) -> None:
        self._scheduled = False
        if not self._queued:
            return
        protocol = self._protocol
        batch, self._queued = self._queued, []
        data, self._buffer = b"".join(self._buffer), []
        if protocol is None or protocol.transport is None or protocol.transport.is_closing():
            self._fail(batch, RedisConnectionError("connection to Redis lost"))
            return
        self.round_trips += 1
        self._inflight.extend(batch)
        protocol.transport.write(data)
        loop = asyncio.get_running_loop()
        loop.call_later(self._timeout_s, self._expire, batch)

    def _expire(self, batch: list[_Call | None]) -> None:
        late = [c for c in batch if c is not None and not c.fut.done()]
        if late:
            self._fail(late, TimeoutError("Redis did not answer in time"))
            # replies may still come for them: they are matched and dropped (fut done)

    def _reply(self, reply: Any) -> None:
        call = self._inflight.popleft()
        if call is None or call.fut.done():
            return
        if isinstance(reply, hiredis.ReplyError):
            message = str(reply)
            if message.startswith("NOSCRIPT"):
                self._retry_with_source(call)
                return
            call.fut.set_exception(ResponseError(message))
            return
        call.fut.set_result(reply)

    def _retry_with_source(self, call: _Call) -> None:
        """EVAL with the source once; Redis caches the script for the EVALSHAs after it."""
        protocol = self._protocol
        if protocol is None or protocol.transport is None:
            call.fut.set_exception(NoScriptError("script not loaded and connection lost"))
            return
        command = ["EVAL", call.script.script, *call.args[2:]]
        self._inflight.append(call)
        protocol.transport.write(pack(command))

    def _lost(self, exc: Exception | None) -> None:
        self._protocol = None
        pending = [c for c in self._inflight if c is not None]
        self._inflight.clear()
        self._fail(pending, RedisConnectionError(f"connection to Redis lost: {exc}"))

    @staticmethod
    def _fail(calls: Sequence[_Call | None], exc: Exception) -> None:
        for call in calls:
            if call is not None and not call.fut.done():
                call.fut.set_exception(exc)

    async def close(self) -> None:
        self._flush()
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
        self._fail(list(self._inflight), RedisConnectionError("closed"))
        self._inflight.clear()
