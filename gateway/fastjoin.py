"""The join route served on the connection itself, below aiohttp's request machinery.

A stampede is one route: ``POST /api/v1/flash-sales/{id}/join``. Through aiohttp a join
pays for its request objects, its router, its middleware chain and its response
objects: a bare aiohttp hello costs a worker 45–60 µs of CPU where uvloop with
httptools (llhttp, the parser aiohttp's own C parser is built on) answers the same
fixed body for ~12 µs (``BENCHMARKS.md``, "The join below the framework"). So each
connection starts on :class:`JoinProtocol`. A request is framed here (the head up to
its blank line, then ``Content-Length`` bytes), its head parsed and checked by
httptools, and a join in the plain shape a shopper's client sends is answered by
:func:`gateway.routes.flashsales.take_join` — the very function the aiohttp route
calls, so the checks, their order and the answers are the same — with the envelope,
request id, figures, access log and plan gate of the app's middleware. A queued sale's
crowd polls its place the same way: ``GET /api/v1/flash-sales/{id}/queue?ticket=…`` is
answered by :func:`gateway.routes.waitingroom.ticket_status`, the route's own function,
from the worker's copy of the queue.

Anything else — another route, another query string, percent-encoding, chunked bodies,
``Expect``, ``Upgrade``, ``Connection: close``, HTTP/1.0, a body above the app's limit,
a head httptools refuses or one larger than :data:`MAX_HEAD` — hands the connection to
aiohttp for good: its bytes from the start of that request go to a fresh
``RequestHandler`` of the app's own server, which answers them exactly as if it had
had the connection from the start (responses stay in order: a join still in flight
answers first). One connection never mixes the two for the same request.

Requests on one connection are answered one at a time, in order, as aiohttp does; a
shopper whose connection drops mid-join still gets the join done (it is never
cancelled halfway: the order may already be in Redis).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final, NamedTuple, cast

import httptools
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.log import access_logger
from multidict import CIMultiDict, CIMultiDictProxy

from flashsale.errors import ShopReadOnly, ok_envelope
from flashsale.plans import Switches
from flashsale.waitingroom.signing import MAX_SIGNED_LEN
from gateway import appkeys
from gateway.accesslog import JsonAccessLogger
from gateway.auth import bearer_of, principal_of
from gateway.flash_runtime import FLASH
from gateway.http import JSON_CONTENT_TYPE, dumps
from gateway.middlewares import REQUEST_ID, answer_error, new_request_id
from gateway.plans_runtime import SWITCHES
from gateway.routes.flashsales import (
    ADMITTED_JOIN_PATH,
    JOIN_ACCEPTED,
    JOIN_PATH,
    JoinAnswer,
    refuse_in_process,
    reserve,
    take_join,
)
from gateway.routes.waitingroom import POLL_PATH, poll, ticket_status
from gateway.validation import path_int

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine

log = logging.getLogger("gateway.fastjoin")

# aiohttp's own limit on a request line and each header is 8190 bytes; a join's head is
# a few hundred. A longer one goes to aiohttp, which answers it by its own rules.
MAX_HEAD: Final = 8192
# Bytes held while a join is in flight (pipelined requests); past this, reading pauses.
MAX_BUFFERED: Final = 64 * 1024
# Requests a worker answers inside one I/O phase of its loop before the rest wait for the
# next turn. libuv polls again at once while 1,024 sockets are ready (up to 48 times) and
# runs the loop's ready callbacks — every task step, every timer — only after: a worker
# with thousands of busy connections answered ~50k refusals between two steps of its
# tasks, so its revocation list went 15 s without a refresh (503 AUTH_UNAVAILABLE to a
# quarter of the crowd) and every reservation waited as long.
MAX_BURST: Final = 1024
_JOIN_PREFIX: Final = b"POST /api/v1/flash-sales/"
_POLL_PREFIX: Final = b"GET /api/v1/flash-sales/"
_SUFFIX: Final = b" HTTP/1.1"
# The join path and the admission path, in the characters that need no decoding; the
# route's canonical names as the figures and the access log know them.
_TARGET: Final = re.compile(
    rb"/api/v1/flash-sales/([0-9]{1,19})/join(?:/([A-Za-z0-9._~-]{1,512}))?"
)
# A waiting room's poll with its one ticket, in the characters that need no decoding (a
# signed ticket is made of them); any other query goes to aiohttp.
_POLL: Final = re.compile(
    rb"(/api/v1/flash-sales/([0-9]{1,19})/queue)\?ticket=([A-Za-z0-9._~-]{1,%d})" % MAX_SIGNED_LEN
)
# Headers whose presence means the request is not the plain shape served here.
_HAND_OVER: Final = frozenset(
    (b"transfer-encoding", b"expect", b"upgrade", b"content-encoding", b"te")
)
_CONTENT_TYPE: Final = f"Content-Type: {JSON_CONTENT_TYPE}\r\n".encode()
_SERVER: Final = f"Server: {SERVER_SOFTWARE}\r\n".encode()
_STATUS_LINES: Final = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}


class _Date:
    """The ``Date`` header, formatted once a second (as aiohttp does)."""

    __slots__ = ("_line", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def line(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._line = f"Date: {formatdate(second, usegmt=True)}\r\n".encode()
        return self._line


_DATE: Final = _Date()


class JoinServer(web.Server):
    """The app's aiohttp server whose connections start on :class:`JoinProtocol`.

    Built from the server aiohttp made for the app, so a connection handed over gets a
    ``RequestHandler`` with exactly the app's handler, request factory and settings;
    shutting down also closes the connections still held here (a join in flight first
    finishes, within the same timeout aiohttp gives its handlers).
    """

    def __init__(self, inner: web.Server, app: web.Application) -> None:
        super().__init__(
            inner.request_handler,
            request_factory=inner.request_factory,
            handler_cancellation=inner.handler_cancellation,
            # the loop and handler settings aiohttp built the app's server with
            loop=inner._loop,
            **inner._kwargs,
        )
        self.app = app
        self.joins: set[JoinProtocol] = set()
        # requests answered here and connections handed to aiohttp (tests read them)
        self.served = 0
        self.handed_over = 0
        # requests answered since the loop last ran its ready callbacks (MAX_BURST)
        self.burst = 0
        self._turn_queued = False
        self.keepalive_s: float = self._kwargs.get("keepalive_timeout", 3630)
        # as aiohttp's RequestHandler: its own access logger unless one is given
        logger = self._kwargs.get("access_log", access_logger)
        access_class = self._kwargs.get("access_log_class")
        self.access: JsonAccessLogger | None = None
        if logger is not None and access_class is JsonAccessLogger:
            self.access = JsonAccessLogger(logger, "")
        self.max_body = app[appkeys.SETTINGS].max_body_bytes  # the app's client_max_size
        # the app's stores, set up by its startup before aiohttp builds its server: looked
        # up once here rather than through Application.__getitem__ on every join
        self.tokens = app[appkeys.TOKENS]
        self.switches = app[SWITCHES]
        self.stats = app[appkeys.REQUEST_STATS]
        self.cache = app[FLASH].cache

    def __call__(self) -> JoinProtocol:  # type: ignore[override]
        return JoinProtocol(self)

    def count(self) -> None:
        """One more request answered in this turn of the loop."""
        self.served += 1
        self.burst += 1
        if not self._turn_queued:  # runs with the loop's ready callbacks: a turn has passed
            self._turn_queued = True
            self._loop.call_soon(self._turned)

    def _turned(self) -> None:
        self.burst = 0
        self._turn_queued = False

    def handler(self) -> web.RequestHandler:
        """A plain aiohttp connection handler of this app."""
        return super().__call__()

    def pre_shutdown(self) -> None:
        for conn in list(self.joins):
            conn.close_when_idle()
        super().pre_shutdown()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (aiohttp's)
        busy = [c.in_flight for c in self.joins if c.in_flight is not None]
        if busy:
            await asyncio.wait(busy, timeout=timeout)
        for conn in list(self.joins):
            conn.abort()
        await super().shutdown(timeout)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose server serves the join route on the connection."""

    async def _make_server(self) -> web.Server:
        return JoinServer(await super()._make_server(), self.app)


class _Request(NamedTuple):
    started: float
    rid: str
    method: str
    path: str  # without the query string, as aiohttp's request.path
    route: str  # the route's canonical name


# What a request served here answers once its I/O is done: status, body, the order id.
Answered = tuple[int, bytes, str | None]


def _accepted(answer: JoinAnswer) -> Answered:
    return 202, dumps({"code": 202, "message": JOIN_ACCEPTED, "data": answer.data}), answer.order_id


def _polled(view: dict[str, Any]) -> Answered:
    return 200, dumps(ok_envelope(view)), None


class JoinProtocol(asyncio.Protocol):
    __slots__ = (
        "_buffer",
        "_closing",
        "_deferred",
        "_eof",
        "_events",
        "_head",
        "_headers",
        "_idle",
        "_last",
        "_match",
        "_need",
        "_parser",
        "_paused",
        "_peer",
        "_server",
        "_stalled",
        "_transport",
        "_url",
        "in_flight",
    )

    def __init__(self, server: JoinServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        # llhttp's message events so far (begin, headers complete, complete): the framing
        # here and llhttp's must agree on where each request starts and ends
        self._events = 0
        self._head = 0  # length of a parsed head whose body is still awaited
        self._need = 0  # the whole request's length once its head is parsed
        self._peer: str | None = None
        self.in_flight: asyncio.Task[None] | None = None
        self._closing = False  # no further request is taken (shutdown, a fault)
        self._eof = False  # the peer sent all it will: answer what is buffered, then close
        self._paused = False  # reading paused by us (buffer full, or deferred)
        self._deferred = False  # waiting for the loop's next turn (MAX_BURST)
        self._stalled = False  # the peer does not read its answers
        self._idle: asyncio.TimerHandle | None = None
        self._last = 0.0  # loop time of the last answer (the keep-alive clock)
        self._match: re.Match[bytes] | None = None

    # ------------------------------------------------------------ httptools callbacks

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_message_begin(self) -> None:
        self._events += 1

    def on_headers_complete(self) -> None:
        self._events += 1

    def on_message_complete(self) -> None:
        self._events += 1

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._peer = peer[0] if isinstance(peer, tuple) else None
        self._server.joins.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.joins.discard(self)
        self._transport = None
        self._closing = True
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self.in_flight is None:
            self._next()
        elif len(self._buffer) > MAX_BUFFERED and not self._paused and self._transport:
            self._paused = True
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        # what was sent before the end is still answered, then the connection closes
        self._eof = True
        self._next()
        return True

    def pause_writing(self) -> None:
        self._stalled = True
        if self._transport is not None and not self._paused:
            self._paused = True
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._stalled = False
        if self.in_flight is None:
            self._resume()
            self._next()

    # ------------------------------------------------------------ shutdown

    def close_when_idle(self) -> None:
        self._closing = True
        if self.in_flight is None:
            self._close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _arm_idle(self) -> None:
        loop = asyncio.get_running_loop()
        self._last = loop.time()
        self._idle = loop.call_at(self._last + self._server.keepalive_s, self._idle_check)

    def _idle_check(self) -> None:
        """Close a connection idle past the keep-alive timeout, as aiohttp closes its
        own; one timer per connection, moved on lazily rather than per request."""
        self._idle = None
        if self._transport is None or self.in_flight is not None:
            return  # the join in flight re-arms it when it answers
        loop = asyncio.get_running_loop()
        due = self._last + self._server.keepalive_s
        if loop.time() < due:
            self._idle = loop.call_at(due, self._idle_check)
        else:
            self._close()

    def _defer(self) -> None:
        """This turn of the loop has answered its share (MAX_BURST): the buffered requests
        wait for the next one, reading paused meanwhile, so that tasks and timers run."""
        self._deferred = True
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        asyncio.get_running_loop().call_soon(self._continue)

    def _continue(self) -> None:
        self._deferred = False
        if self._transport is None:
            return
        self._resume()
        self._next()

    def _resume(self) -> None:
        if self._paused and not self._stalled and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()

    # ------------------------------------------------------------ framing

    def _next(self) -> None:
        """Answer the whole requests in the buffer, in order, until one needs a task (a
        reservation) or the buffer holds no whole request."""
        while self.in_flight is None and self._take():
            pass
        if self._eof and self.in_flight is None and not self._deferred:
            self._close()  # the peer sent its last request and has every answer

    def _take(self) -> bool:
        """Take the next whole request from the buffer and start it; False when there is
        none to take (or the connection went to aiohttp)."""
        if self._closing or self._stalled or self._transport is None:
            return False
        buffer = self._buffer
        if not buffer or self._deferred:
            return False
        if self._server.burst >= MAX_BURST:
            self._defer()
            return False
        if not self._head:
            end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD)
            if end < 0:
                if (
                    len(buffer) >= MAX_HEAD
                    or not _ours(bytes(buffer[: len(_JOIN_PREFIX)]))
                    or buffer.count(b"\n") != buffer.count(b"\r\n")  # bare LF: not ours
                ):
                    self._hand_over()
                return False
            if not self._parse_head(end + 4):
                self._hand_over()
                return False
        if len(buffer) < self._need:
            return False  # the body is still on its way
        body = bytes(buffer[self._head : self._need])
        if body:
            try:
                self._parser.feed_data(body)
            except httptools.HttpParserError:
                self._hand_over()
                return False
            if self._events != 3:  # llhttp did not end the request where its length does
                self._hand_over()
                return False
        del buffer[: self._need]
        self._head = self._need = 0
        match, headers = self._match, self._headers
        self._url, self._headers, self._match = b"", [], None
        assert match is not None  # set with _head by _parse_head
        self._server.count()
        self._start(match, headers, body)
        return True

    def _parse_head(self, length: int) -> bool:
        """Parse the head of ``length`` bytes; False where aiohttp must answer it."""
        buffer = self._buffer
        line_end = buffer.find(b"\r\n")
        line = bytes(buffer[:line_end])
        if not line.endswith(_SUFFIX):
            return False
        if line.startswith(_JOIN_PREFIX):
            match = _TARGET.fullmatch(line, len(b"POST "), len(line) - len(_SUFFIX))
        elif line.startswith(_POLL_PREFIX):
            match = _POLL.fullmatch(line, len(b"GET "), len(line) - len(_SUFFIX))
        else:
            return False
        if match is None:
            return False
        head = buffer[:length]  # a copy: the buffer moves on while llhttp reads it
        if head.count(b"\n") != head.count(b"\r\n"):
            return False  # a bare LF: llhttp could see the head end before the blank line
        self._events = 0
        try:
            self._parser.feed_data(head)
        except httptools.HttpParserError:
            return False
        size = 0
        lengths = 0
        for name, value in self._headers:
            lower = name.lower()
            if lower in _HAND_OVER:
                return False
            if lower == b"content-length":
                lengths += 1
                if not value.isdigit() or len(value) > 12:
                    return False
                size = int(value)
            elif lower == b"connection" and value.lower() != b"keep-alive":
                return False
        if lengths > 1 or size > self._server.max_body or not self._parser.should_keep_alive():
            return False
        if size and match.re is _POLL:
            return False  # a poll with a body: not the plain shape
        if self._events != (3 if size == 0 else 2):  # begun, headers done, (complete)
            return False
        self._head = length
        self._need = length + size
        self._match = match
        return True

    def _hand_over(self) -> None:
        """From here on aiohttp serves this connection, from the start of this request."""
        if self.in_flight is not None:
            return  # never while a join is in flight: _next runs only once it answered
        transport = self._transport
        if transport is None:
            return
        self._server.joins.discard(self)
        self._server.handed_over += 1
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        handler = self._server.handler()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._paused:
            self._paused = False
            transport.resume_reading()
        data, self._buffer = bytes(self._buffer), bytearray()
        self._transport = None
        if data:
            handler.data_received(data)
        if self._eof and not transport.is_closing():
            handler.eof_received()

    # ------------------------------------------------------------ the join

    def _start(self, match: re.Match[bytes], raw: list[tuple[bytes, bytes]], body: bytes) -> None:
        """A join up to what needs I/O, here and now: the plan gate, the token and the
        in-process refusals (a stampede's bulk) are answered without a task; a join that
        goes on to Redis runs in one."""
        started = time.perf_counter()
        server = self._server
        app = server.app
        headers = CIMultiDictProxy(
            CIMultiDict(
                [
                    (n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
                    for n, v in raw
                ]
            )
        )
        if match.re is _POLL:
            self._poll(started, match, headers)
            return
        target, sale_id_raw, admission_raw = match.group(0, 1, 2)
        request = _Request(
            started,
            new_request_id(headers.get(REQUEST_ID)),
            "POST",
            target.decode(),
            JOIN_PATH if admission_raw is None else ADMITTED_JOIN_PATH,
        )
        admission = None if admission_raw is None else admission_raw.decode()
        try:
            _plan_gate(server.switches)
            # the route's role, as the router checks it for the aiohttp route (auth="user")
            principal = principal_of(headers, server.tokens)
            sale_id = sale_id_raw.decode()
            rest: Coroutine[Any, Any, JoinAnswer]
            sale = server.cache.sales.get(path_int(sale_id, "flash sale"))
            if sale is None:  # not known to this worker yet: take_join asks Redis
                rest = take_join(
                    app,
                    principal,
                    headers,
                    sale_id,
                    admission,
                    _body(body),
                    self._peer,
                    request.rid,
                )
            else:  # take_join's own steps, the synchronous ones here
                refuse_in_process(app, principal, headers, sale, admission)
                rest = reserve(app, principal, headers, sale, _body(body), self._peer, request.rid)
        except Exception as exc:  # noqa: BLE001 (answer_error logs what is not ours)
            self._refused(request, exc)
            return
        self.in_flight = asyncio.get_running_loop().create_task(
            self._finish(request, rest, _accepted), name="join"
        )

    def _poll(self, started: float, match: re.Match[bytes], headers: CIMultiDictProxy[str]) -> None:
        """A waiting room's poll, as the aiohttp route answers it (optional token, then
        the sale, then the ticket): from the worker's copy of the queue, without a task
        unless the sale is not known to this worker yet."""
        server = self._server
        path, sale_id_raw, ticket_raw = match.group(1, 2, 3)
        request = _Request(
            started, new_request_id(headers.get(REQUEST_ID)), "GET", path.decode(), POLL_PATH
        )
        signed = ticket_raw.decode()
        try:
            token = bearer_of(headers)  # the route's "optional": a token sent must be valid
            principal = None if token is None else server.tokens.verify(token)
            sale = server.cache.sales.get(path_int(sale_id_raw.decode(), "flash sale"))
            if sale is None:  # not known to this worker yet: the route's own steps
                rest = poll(server.app, principal, sale_id_raw.decode(), signed)
                self.in_flight = asyncio.get_running_loop().create_task(
                    self._finish(request, rest, _polled), name="poll"
                )
                return
            view = ticket_status(server.app, sale, signed, principal)
        except Exception as exc:  # noqa: BLE001 (answer_error logs what is not ours)
            self._refused(request, exc)
            return
        status, payload, _ = _polled(view)
        self._done(request, status, payload, None, None)

    async def _finish(
        self,
        request: _Request,
        rest: Coroutine[Any, Any, Any],
        answered: Callable[[Any], Answered],
    ) -> None:
        try:
            try:
                result = await rest
            except Exception as exc:  # noqa: BLE001 (answer_error logs what is not ours)
                self._refused(request, exc)
            else:
                status, payload, order_id = answered(result)
                self._done(request, status, payload, None, order_id)
        except Exception:
            # a fault of this module, not of the join (those are answered): the
            # connection is closed rather than left waiting
            log.exception("join connection failed")
            self._closing = True
        finally:
            self.in_flight = None
            self._answered()

    def _refused(self, request: _Request, exc: Exception) -> None:
        stats = self._server.stats
        status, payload, extra = answer_error(exc, request.rid, stats, request.method, request.path)
        self._done(request, status, payload, extra, None)

    def _done(
        self,
        request: _Request,
        status: int,
        payload: bytes,
        extra: dict[str, str] | None,
        order_id: str | None,
    ) -> None:
        self._answer(status, payload, request.rid, extra)
        self._last = asyncio.get_running_loop().time()  # the keep-alive clock
        seconds = time.perf_counter() - request.started
        self._server.stats.record(request.method, request.route, status, seconds)
        access = self._server.access
        if access is not None and access.enabled:
            access.line(
                request.method, request.path, status, seconds, request.rid, self._peer, order_id
            )

    def _answer(self, status: int, payload: bytes, rid: str, extra: dict[str, str] | None) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return  # the shopper left; the join itself is done either way
        head = [
            _STATUS_LINES.get(status) or f"HTTP/1.1 {status} Unknown\r\n".encode(),
            _CONTENT_TYPE,
            f"{REQUEST_ID}: {rid}\r\n".encode(),
        ]
        if extra:
            head += [f"{k}: {v}\r\n".encode() for k, v in extra.items()]
        head += [b"Content-Length: %d\r\n" % len(payload), _DATE.line(), _SERVER, b"\r\n", payload]
        transport.write(b"".join(head))

    def _answered(self) -> None:
        if self._transport is None:
            return
        if self._closing:
            self._close()
            return
        if self._idle is None:
            self._arm_idle()
        self._resume()
        self._next()


def _ours(start: bytes) -> bool:
    """Whether a request beginning with ``start`` may be one served here (a join or a
    poll): more bytes are awaited before deciding; anything else is aiohttp's at once."""
    return (
        _JOIN_PREFIX.startswith(start)
        or start.startswith(_POLL_PREFIX)
        or _POLL_PREFIX.startswith(start)
    )


def _plan_gate(switches: Switches) -> None:
    """The plan gate of :mod:`gateway.plans_runtime` for a join: a write of the flash
    path, never shed, refused only while the shop is read-only."""
    if switches.read_only:
        raise ShopReadOnly


def _body(body: bytes) -> Callable[[], Awaitable[bytes]]:
    async def read() -> bytes:
        return body

    return read
