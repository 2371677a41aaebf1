"""The waiting room of queued sales: enter, poll, the event stream, the proof-of-work challenge.

Polls and the stream answer from the worker's copy of the queue (no database, no Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from functools import partial
from typing import Annotated, Any, Final, Literal

import orjson
from aiohttp import web
from msgspec import UNSET, Meta, UnsetType

from flashsale.auth import Principal
from flashsale.errors import (
    AccountTooNew,
    DeviceIdRequired,
    EntryLimited,
    NotFound,
    ProofRequired,
    QueueNotOpen,
    RateLimited,
    SaleEnded,
    SaleNotQueued,
    ServiceUnavailable,
    SoldOut,
    TicketInvalid,
)
from flashsale.flash.cache import SaleState, now_ms
from flashsale.timing import STREAM_KEEPALIVE_S
from flashsale.waitingroom.signing import MAX_SIGNED_LEN, MAX_SOLUTION_LEN, Ticket
from gateway import appkeys
from gateway.flash_runtime import FLASH
from gateway.http import header_text, ok
from gateway.middlewares import REQUEST_ID, request_id
from gateway.routes.flashsales import ADMITTED_JOIN_PATH, client_ip
from gateway.routing import Route
from gateway.shapes import Answer, Body, Query, or_none, read_optional_body
from gateway.streams import start_stream
from gateway.validation import path_int
from gateway.waitingroom_runtime import WAITING_ROOM

DEVICE_HEADER: Final = "X-Device-Id"
# A ticket's poll: the route's canonical name (the figures and the access log know it so)
POLL_PATH: Final = "/api/v1/flash-sales/{sale_id}/queue"
MAX_DEVICE_ID: Final = 128

Signed = Annotated[str, Meta(min_length=1, max_length=MAX_SIGNED_LEN)]


class EnterBody(Body):
    challenge: Signed | UnsetType = UNSET
    solution: Annotated[str, Meta(min_length=1, max_length=MAX_SOLUTION_LEN)] | UnsetType = UNSET


# The signer reads the ticket itself (TICKET_INVALID): these state it for the document.
class TicketQuery(Query):
    ticket: Signed


class StreamQuery(Query):
    ticket: Signed | None = None


def with_join_path(view: dict[str, Any]) -> dict[str, Any]:
    """A ticket's status with its admission's own join path beside the token: the waiting
    room hands out the token, the path is this layer's."""
    token = view.get("join_token")
    if token is not None:
        view["join_path"] = ADMITTED_JOIN_PATH.format(
            sale_id=view["flash_sale_id"], admission=token
        )
    return view


async def _sale_of(app: web.Application, sale_id_text: str) -> SaleState:
    sale = await app[FLASH].cache.get(path_int(sale_id_text, "flash sale"))
    if sale is None:
        raise NotFound("flash sale not found")
    return sale


async def _sale(request: web.Request) -> SaleState:
    return await _sale_of(request.app, request.match_info["sale_id"])


def _ticket(app: web.Application, sale: SaleState, signed: str | None) -> Ticket:
    if signed is None:
        raise TicketInvalid
    entry = app[WAITING_ROOM].signer.read_ticket(signed)
    if entry is None or entry.sale_id != sale.id:
        raise TicketInvalid
    return entry


def ticket_status(
    app: web.Application, sale: SaleState, signed: str | None, principal: Principal | None
) -> dict[str, Any]:
    """What a poll answers, once the sale is known: synchronous, so that the connection
    protocol of :mod:`gateway.fastjoin` answers a waiting crowd's polls without a task."""
    entry = _ticket(app, sale, signed)
    viewer = None if principal is None else principal.user_id
    return with_join_path(app[WAITING_ROOM].status(sale, entry, now_ms(), viewer=viewer))


async def poll(
    app: web.Application, principal: Principal | None, sale_id_text: str, signed: str | None
) -> dict[str, Any]:
    """A poll from what the HTTP request carries, whichever server parsed it (the route
    below, or :mod:`gateway.fastjoin` for a sale its worker has not loaded yet)."""
    return ticket_status(app, await _sale_of(app, sale_id_text), signed, principal)


async def enter(request: web.Request, principal: Principal) -> web.Response:
    app = request.app
    sale = await _sale(request)
    body = await read_optional_body(request, EnterBody)
    # an empty header is no device id (DEVICE_ID_REQUIRED where the sale asks for one)
    device = request.headers.get(DEVICE_HEADER) and header_text(
        request, DEVICE_HEADER, max_len=MAX_DEVICE_ID
    )
    room = app[WAITING_ROOM]
    entry = await room.enter(
        sale,
        principal.user_id,
        client_ip=client_ip(request),
        device_id=device or "",
        challenge=or_none(body.challenge),
        solution=or_none(body.solution),
        db=app[appkeys.DB],
    )
    data = {"ticket": entry.ticket, "replayed": entry.replayed}
    data |= with_join_path(room.status(sale, entry.entry, now_ms(), viewer=principal.user_id))
    return ok(data, status=200 if entry.replayed else 201, message="in the queue")


async def queue(request: web.Request, principal: Principal | None) -> web.Response:
    return ok(
        await poll(
            request.app, principal, request.match_info["sale_id"], request.query.get("ticket")
        )
    )


async def challenge(request: web.Request, principal: Principal) -> web.Response:
    sale = await _sale(request)
    if sale.mode != "queued":
        raise SaleNotQueued
    room = request.app[WAITING_ROOM]
    return ok(room.challenge(sale, principal.user_id, room.config(sale), now_ms()))


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: ``sale`` (the public state; a queued sale's adds ``queue``:
    entrants, admitted_through, waiting) for everyone, and ``queue`` (what a poll answers)
    for a ticket holder, each sent when it changes."""
    app = request.app
    sale = await _sale(request)
    signed = request.query.get("ticket")
    entry = _ticket(app, sale, signed) if signed is not None else None
    room = app[WAITING_ROOM]
    slots = app[appkeys.STREAMS]
    with slots.hold(client_ip(request)):
        resp = await start_stream(request, **{REQUEST_ID: request_id(request)})
        ends = time.monotonic() + slots.max_s
        last: dict[str, bytes] = {}
        with contextlib.suppress(ConnectionResetError):
            while (left_s := ends - time.monotonic()) > 0:
                changed = room.changed
                state = app[FLASH].cache.sales.get(sale.id, sale)
                now = now_ms()
                public = state.public(now)
                if state.mode == "queued":
                    public["queue"] = room.summary(sale.id)
                frames: list[tuple[str, Any]] = [("sale", public)]
                if entry is not None:
                    # EventSource sends no bearer: with a hidden join path, the page asks the
                    # poll (with its bearer) for the admission when this says admitted
                    view = room.status(state, entry, now, viewer=None)
                    frames.append(("queue", with_join_path(view)))
                for name, data in frames:
                    payload = orjson.dumps(data)
                    if last.get(name) != payload:
                        last[name] = payload
                        await resp.write(
                            b"event: " + name.encode() + b"\ndata: " + payload + b"\n\n"
                        )
                if state.closed or now >= state.end_ms:
                    break
                if request.transport is None or request.transport.is_closing():
                    break  # the page went away
                boundary = state.start_ms if now < state.start_ms else state.end_ms
                wait_s = min(STREAM_KEEPALIVE_S, left_s, max(0.05, (boundary - now) / 1000))
                try:
                    await asyncio.wait_for(changed.wait(), wait_s)
                except TimeoutError:  # nothing moved: a comment keeps proxies from timing out
                    await resp.write(b": keepalive\n\n")
    return resp


class TicketStatus(Answer):
    """A ticket's place. ``position`` is null until the lottery is drawn; ``ahead`` and
    ``estimated_wait_s`` are set while waiting (``ahead`` 0 once admitted). Once admitted,
    ``join_expires_at``, and the join token and path (with hidden_join_path: only for the
    ticket's own account)."""

    flash_sale_id: int
    entered_at: str
    position: int | None
    ahead: int | None
    entrants: int
    admitted_through: int
    estimated_wait_s: float | None
    start_time: str
    state: Literal["ended", "sold_out", "lottery", "expired", "admitted", "waiting"]
    join_expires_at: str | UnsetType = UNSET
    join_token: str | UnsetType = UNSET
    join_path: str | UnsetType = UNSET


class Entered(TicketStatus, kw_only=True):
    """The signed ticket (``replayed``: the one of an earlier entry) and its place."""

    ticket: str
    replayed: bool


class Challenge(Answer):
    challenge: str
    difficulty: int
    algorithm: str


route = partial(Route, tag="waiting-room")
ROUTES = [
    route(
        "POST",
        "/api/v1/flash-sales/{sale_id}/enter",
        enter,
        "Enter a queued sale's waiting room: a signed ticket (the same one when entered again). "
        "Optional X-Device-Id header; challenge and solution when the sale asks for a proof "
        "of work",
        auth="user",
        body=EnterBody,
        body_required=False,
        success={201: "entered"},
        responses=(
            DeviceIdRequired,
            ProofRequired,
            AccountTooNew,
            SaleNotQueued,
            QueueNotOpen,
            SaleEnded,
            SoldOut,
            EntryLimited,
        ),
        answer=Entered,
    ),
    route(
        "GET",
        POLL_PATH,
        queue,
        "A ticket's place: state (lottery, waiting, admitted, expired, sold_out, ended), "
        "position, people ahead, estimated wait; the join token and path once admitted "
        "(with hidden_join_path: only to the ticket's own account, by its bearer)",
        query=TicketQuery,
        auth="optional",
        responses=(TicketInvalid,),
        answer=TicketStatus,
    ),
    route(
        "GET",
        "/api/v1/flash-sales/{sale_id}/events",
        events,
        "Server-sent events of a sale: 'sale' (its public state) and, with a ticket, 'queue' "
        "(what a poll answers), each when it changes",
        query=StreamQuery,
        envelope=False,
        responses=(TicketInvalid, RateLimited, ServiceUnavailable),
    ),
    route(
        "GET",
        "/api/v1/flash-sales/{sale_id}/challenge",
        challenge,
        "A proof-of-work challenge for entering this sale",
        auth="user",
        responses=(SaleNotQueued,),
        answer=Challenge,
    ),
]
