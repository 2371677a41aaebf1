"""The waiting room of a queued sale: entering, admitting, and answering polls in-process.

Order and admission live in Redis, hash-tagged with the sale (``fs:{sale:<id>}:q…``), so any
number of workers and hosts share one queue:

- entering (lua/queue_enter.lua) puts a shopper in the lottery before the start (its place
  is the rank of a random draw, fixed at the start), or after it at the next position in
  arrival order; the ticket is signed here and carries the entry.
- one admitter per sale (the worker holding the sale's lease, lua/machine_lease.lua) runs
  lua/queue_admit.lua a few times a second: it admits the next positions at the sale's rate,
  only while units remain, and never more outstanding admissions than remaining × overbook.
- every worker keeps a copy of each queue (counters and the admission log) refreshed every
  ``queue_tick_ms``, so a poll, the join-token check and the event stream do no I/O.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

import asyncpg
from redis.asyncio import Redis

from flashsale.errors import (
    AccountTooNew,
    AdmissionExpired,
    DeviceIdRequired,
    EntryLimited,
    NotAdmitted,
    NotFound,
    ProofRequired,
    QueueNotOpen,
    SaleEnded,
    SaleNotQueued,
    SoldOut,
    ValidationFailed,
)
from flashsale.flash import lifecycle
from flashsale.flash.cache import SaleCache, SaleState, iso_ms, now_ms
from flashsale.settings import Settings
from flashsale.stores import rediskeys, tasks
from flashsale.stores.metrics import Metrics
from flashsale.stores.scripts import (
    FlashScripts,
    Lease,
    QueueAdmit,
    QueueEnter,
    QueueEnterResult,
    parse_queue_admit,
    parse_queue_enter,
    register,
)
from flashsale.timing import QUEUE_ACCEPT_RATE_WINDOW_S
from flashsale.waitingroom.config import QueueConfig
from flashsale.waitingroom.signing import Signer, Ticket

log = logging.getLogger(__name__)

LOTTERY_DRAW_BITS: Final = 52  # a draw Lua's doubles hold exactly
ADAPTIVE_FLOOR_PER_S: Final = 20.0  # the admission rate before any join was measured
ADAPTIVE_GAIN: Final = 2.0  # admit this many times the measured accept rate
OUTSTANDING_LOOKED_AT: Final = 5000  # admissions the admitter checks per step
RATE_SAMPLES: Final = 40

SQL_ACCOUNT_CREATED = "SELECT created_at FROM users WHERE id = $1"
SQL_SET_MODE = """
UPDATE flash_sales SET mode = COALESCE($2, mode),
       queue_settings = COALESCE(queue_settings || $3::jsonb, queue_settings), updated_at = now()
WHERE id = $1 AND closed_at IS NULL AND end_at > now()
  AND (COALESCE($2, mode) = 'open' OR buckets = 1)
RETURNING id
"""
SQL_SALE_EXISTS = "SELECT buckets FROM flash_sales WHERE id = $1"


@dataclass(slots=True)
class QueueCopy:
    """One worker's copy of one sale's queue."""

    drawn: bool = False
    lottery: int = 0
    arrived: int = 0
    entered: int = 0
    admitted: int = 0  # positions 1..admitted have been admitted
    remaining: int | None = None
    log_through: list[int] = field(default_factory=list)  # admission steps: last position
    log_at: list[int] = field(default_factory=list)  # … and when (ms)
    lottery_rank: dict[int, int] | None = None  # user → position, once the lottery is drawn
    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=RATE_SAMPLES))

    def admitted_at(self, position: int) -> int | None:
        i = bisect.bisect_left(self.log_through, position)
        return self.log_at[i] if i < len(self.log_at) else None

    def admit_rate(self) -> float:
        """Positions admitted per second over the recent refreshes."""
        if len(self.samples) < 2:
            return 0.0
        (t0, a0), (t1, a1) = self.samples[0], self.samples[-1]
        return (a1 - a0) / (t1 - t0) if t1 > t0 else 0.0


@dataclass(slots=True)
class Entry:
    ticket: str
    entry: Ticket
    replayed: bool


@dataclass(slots=True)
class _Admitter:
    tokens: float = 0.0
    last: float = 0.0
    sold: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))


class WaitingRoom:
    """Each worker's waiting room of every queued sale: one per worker."""

    def __init__(
        self, settings: Settings, redis: Redis, cache: SaleCache, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.cache = cache
        self.metrics = metrics
        self.signer = Signer(settings.secret)
        self.queues: dict[int, QueueCopy] = {}
        self._configs: dict[int, tuple[bytes, QueueConfig]] = {}
        self._enter = register(redis, "queue_enter")
        self._admit = register(redis, "queue_admit")
        self._lease = register(redis, "machine_lease")
        self._owner = secrets.token_hex(8)
        self._admitters: dict[int, _Admitter] = {}
        self.changed = asyncio.Event()  # set (and replaced) when any sale or queue moved
        self._sales_seen: dict[int, tuple[int, bool, int, str]] = {}

    # --- configuration ---

    def config(self, sale: SaleState) -> QueueConfig:
        cached = self._configs.get(sale.id)
        if cached is not None and cached[0] == sale.queue_cfg:
            return cached[1]
        cfg = QueueConfig.parse(sale.queue_cfg, self.settings)
        self._configs[sale.id] = (sale.queue_cfg, cfg)
        return cfg

    def queued_sales(self) -> list[SaleState]:
        return [s for s in self.cache.sales.values() if s.mode == "queued"]

    # --- the copy every worker keeps ---

    async def refresh(self) -> None:
        """Read every queued sale's counters and new admission steps in one round trip."""
        sig = {s.id: (s.remaining, s.closed, s.end_ms, s.mode) for s in self.cache.sales.values()}
        if sig != self._sales_seen:  # an open sale's page on the stream follows it too
            self._sales_seen = sig
            self._wake()
        sales = self.queued_sales()
        if not sales:
            self.queues = {}
            return
        pipe = self.redis.pipeline(transaction=False)
        copies = [self.queues.get(s.id) or QueueCopy() for s in sales]
        for sale, copy in zip(sales, copies, strict=True):
            pipe.hmget(
                rediskeys.queue(sale.id), "drawn", "lottery", "arrived", "entered", "admitted"
            )
            pipe.lrange(rediskeys.queue_admissions(sale.id), len(copy.log_at), -1)
            pipe.hget(rediskeys.sale(sale.id), "remaining")
            if copy.drawn and copy.lottery_rank is None:
                pipe.zrange(rediskeys.queue_lottery(sale.id), 0, -1)
        replies = iter(await pipe.execute())
        fresh: dict[int, QueueCopy] = {}
        moved = False
        mono = time.monotonic()
        for sale, copy in zip(sales, copies, strict=True):
            asked_ranks = copy.drawn and copy.lottery_rank is None
            counters, steps, remaining = next(replies), next(replies), next(replies)
            if asked_ranks:
                members = next(replies)
                copy.lottery_rank = {int(u): i for i, u in enumerate(members, start=1)}
            drawn, lottery, arrived, entered, admitted = (int(x or 0) for x in counters)
            rem = None if remaining is None else int(remaining)
            before = (copy.drawn, copy.admitted, copy.remaining)
            copy.drawn, copy.lottery, copy.arrived = bool(drawn), lottery, arrived
            copy.entered, copy.admitted, copy.remaining = entered, admitted, rem
            for step in steps:
                through, _, at = step.decode().partition("|")
                copy.log_through.append(int(through))
                copy.log_at.append(int(at))
            copy.samples.append((mono, admitted))
            self.metrics.queue_length.labels(str(sale.id)).set(max(0, entered - admitted))
            if before != (copy.drawn, copy.admitted, copy.remaining):
                moved = True
            fresh[sale.id] = copy
        self.queues = fresh
        if moved:
            self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    # --- entering ---

    async def enter(
        self,
        sale: SaleState,
        user_id: int,
        *,
        client_ip: str,
        device_id: str,
        challenge: str | None,
        solution: str | None,
        db: asyncpg.Pool,
    ) -> Entry:
        """Enter the sale's queue (or get the ticket of an earlier entry), after its bot
        defence: device header, proof of work, account age, then the script's limits."""
        if sale.mode != "queued":
            raise SaleNotQueued
        cfg = self.config(sale)
        now = now_ms()
        if cfg.max_entrants_per_device and not device_id:
            raise self._refused("device_id_missing", DeviceIdRequired())
        if cfg.pow_difficulty and not (
            challenge
            and solution
            and self.signer.proof_valid(
                challenge,
                solution,
                sale_id=sale.id,
                user_id=user_id,
                now_ms=now,
                difficulty=cfg.pow_difficulty,
            )
        ):
            raise self._refused(
                "proof", ProofRequired(data=self.challenge(sale, user_id, cfg, now))
            )
        if cfg.min_account_age_min:
            created = await db.fetchval(SQL_ACCOUNT_CREATED, user_id)
            if created is None:
                raise NotFound("account not found")
            age_ms = now - int(created.timestamp() * 1000)
            if age_ms < cfg.min_account_age_min * 60_000:
                raise self._refused("account_age", AccountTooNew())
        opens_ms = sale.start_ms - cfg.opens_before_s * 1000
        raw = await self._enter(
            keys=rediskeys.queue_enter_keys(sale.id),
            args=[
                user_id,
                secrets.randbits(LOTTERY_DRAW_BITS),
                client_ip,
                device_id,
                cfg.max_attempts_per_account,
                cfg.max_entrants_per_ip,
                cfg.max_entrants_per_device,
                opens_ms,
                cfg.max_devices_per_ip,
            ],
        )
        res = parse_queue_enter(raw)
        status = res.status
        if status in (QueueEnter.ENTERED, QueueEnter.ALREADY_IN):
            entry = Ticket(sale.id, user_id, res.kind, res.position, res.entered_ms)
            replayed = status is QueueEnter.ALREADY_IN
            if not replayed:
                self.metrics.queue_entered.inc()
            return Entry(self.signer.ticket(entry), entry, replayed)
        raise self._enter_refusal(status, res)

    def challenge(
        self, sale: SaleState, user_id: int, cfg: QueueConfig, now: int
    ) -> dict[str, Any]:
        return {
            "challenge": self.signer.challenge(sale.id, user_id, now, cfg.pow_difficulty),
            "difficulty": cfg.pow_difficulty,
            "algorithm": "sha256(challenge + ':' + solution) has difficulty leading zero bits",
        }

    def _refused(self, reason: str, error: Exception) -> Exception:
        self.metrics.queue_rejected.labels(reason).inc()
        return error

    def _enter_refusal(self, status: QueueEnter, res: QueueEnterResult) -> Exception:
        match status:
            case QueueEnter.ACCOUNT_LIMIT:
                return self._refused("account", EntryLimited(data={"reason": "account"}))
            case QueueEnter.IP_LIMIT:
                return self._refused("ip", EntryLimited(data={"reason": "ip"}))
            case QueueEnter.DEVICE_LIMIT:
                return self._refused("device", EntryLimited(data={"reason": "device"}))
            case QueueEnter.NOT_OPEN:
                return self._refused(
                    "not_open", QueueNotOpen(data={"opens_at": iso_ms(res.opens_ms)})
                )
            case QueueEnter.ENDED:
                return self._refused("ended", SaleEnded())
            case QueueEnter.SOLD_OUT:
                return self._refused("sold_out", SoldOut())
            case QueueEnter.NOT_QUEUED:
                return SaleNotQueued()
        return NotFound("flash sale not found")

    # --- polls, in-process ---

    def summary(self, sale_id: int) -> dict[str, int]:
        """The queue at a glance, for a sale page (no one's place in it)."""
        copy = self.queues.get(sale_id) or QueueCopy()
        return {
            "entrants": copy.entered,
            "admitted_through": copy.admitted,
            "waiting": max(0, copy.entered - copy.admitted),
        }

    def position(self, copy: QueueCopy, entry: Ticket) -> int | None:
        if entry.kind == "F":
            return entry.position
        if copy.lottery_rank is None:
            return None  # the lottery is not drawn yet
        return copy.lottery_rank.get(entry.user_id)

    def status(
        self, sale: SaleState, entry: Ticket, now: int, *, viewer: int | None
    ) -> dict[str, Any]:
        """What a ticket holder sees: state, position, people ahead, wait, admission.

        ``viewer`` is the account asking (None: not known, as on the event stream). With
        ``hidden_join_path`` the admission's token goes to the ticket's own account
        only: a ticket seen by anyone else (shared, leaked) shows the state without it.
        """
        copy = self.queues.get(sale.id) or QueueCopy()
        cfg = self.config(sale)
        remaining = sale.remaining if copy.remaining is None else copy.remaining
        pos = self.position(copy, entry)
        out: dict[str, Any] = {
            "flash_sale_id": sale.id,
            "entered_at": iso_ms(entry.entered_ms),
            "position": pos,
            "ahead": None,
            "entrants": copy.entered,
            "admitted_through": copy.admitted,
            "estimated_wait_s": None,
            "start_time": iso_ms(sale.start_ms),
        }
        if sale.closed or now >= sale.end_ms:
            out["state"] = "ended"
        elif remaining <= 0 and not sale.recovering:
            out["state"] = "sold_out"  # the queue is closed; it opens again if units return
        elif pos is None:
            out["state"] = "lottery"  # places are drawn at the start
        elif pos <= copy.admitted:
            at = copy.admitted_at(pos)
            expires = (at if at is not None else now) + cfg.join_window_s * 1000
            if expires <= now:
                out["state"] = "expired"
            else:
                out.update(state="admitted", ahead=0, join_expires_at=iso_ms(expires))
                if not cfg.hidden_join_path or viewer == entry.user_id:
                    # the HTTP layer adds the join path the token opens
                    out["join_token"] = self.signer.join_token(sale.id, entry.user_id, expires)
        else:
            ahead = pos - copy.admitted - 1
            rate = copy.admit_rate() or cfg.admit_per_s or ADAPTIVE_FLOOR_PER_S
            wait = (ahead + 1) / rate
            if now < sale.start_ms:
                wait += (sale.start_ms - now) / 1000
            out.update(state="waiting", ahead=ahead, estimated_wait_s=round(wait, 1))
        return out

    def check_admission(
        self, sale: SaleState, user_id: int, token: str | None, *, in_path: bool, now: int
    ) -> None:
        """Raise unless ``token`` admits this user to this sale now (no I/O)."""
        if token is None or (self.config(sale).hidden_join_path and not in_path):
            raise NotAdmitted
        expires = self.signer.join_token_expiry(token, sale.id, user_id)
        if expires is None:
            raise NotAdmitted
        if expires <= now:
            raise AdmissionExpired

    # --- the admitter ---

    async def admit_all(self) -> None:
        """One admission step of each live queued sale whose lease this worker holds."""
        now = now_ms()
        mono = time.monotonic()
        for sale in self.queued_sales():
            if sale.closed or now >= sale.end_ms or now < sale.start_ms:
                self._admitters.pop(sale.id, None)
                continue
            held = await self._lease(
                keys=[rediskeys.queue_lease(sale.id)],
                args=[self._owner, max(1000, 4 * self.settings.queue_tick_ms)],
            )
            if Lease(int(held)) is not Lease.HELD:
                self._admitters.pop(sale.id, None)
                continue
            await self._admit_one(sale, mono)

    def _rate(self, sale: SaleState, cfg: QueueConfig, state: _Admitter, mono: float) -> float:
        if cfg.admit_per_s > 0:
            return cfg.admit_per_s
        return follow_accept_rate(
            state.sold, mono, sale.allotment - sale.remaining - sale.moved_out
        )

    async def _admit_one(self, sale: SaleState, mono: float) -> None:
        cfg = self.config(sale)
        state = self._admitters.setdefault(sale.id, _Admitter(last=mono))
        rate = self._rate(sale, cfg, state, mono)
        state.tokens = min(rate, state.tokens + rate * (mono - state.last))  # a second at most
        state.last = mono
        raw = await self._admit(
            keys=rediskeys.queue_admit_keys(sale.id),
            args=[
                int(state.tokens),
                repr(cfg.overbook),
                cfg.join_window_s * 1000,
                OUTSTANDING_LOOKED_AT,
                self.cache.run_ids.get(sale.id, b""),  # the primary holding this sale
            ],
        )
        res = parse_queue_admit(raw)
        if not res.ran:
            return
        if res.abandoned:
            self.metrics.queue_abandoned.inc(res.abandoned)
        if res.status is QueueAdmit.ADMITTED:
            state.tokens -= len(res.waits_ms)
            self.metrics.queue_admitted.inc(len(res.waits_ms))
            for waited_ms in res.waits_ms:
                self.metrics.queue_wait.observe(waited_ms / 1000)


def follow_accept_rate(sold: deque[tuple[float, int]], mono: float, sold_now: int) -> float:
    """The admission rate of a sale that follows its accept rate: ``ADAPTIVE_GAIN`` times the
    units sold per second over the last ``QUEUE_ACCEPT_RATE_WINDOW_S`` (``sold`` keeps the samples),
    never below ``ADAPTIVE_FLOOR_PER_S``, so the queue speeds up while joins keep up."""
    sold.append((mono, sold_now))
    while len(sold) > 2 and mono - sold[0][0] > QUEUE_ACCEPT_RATE_WINDOW_S:
        sold.popleft()
    (t0, s0), (t1, s1) = sold[0], sold[-1]
    accepted = (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0
    return max(ADAPTIVE_FLOOR_PER_S, ADAPTIVE_GAIN * accepted)


async def set_mode(
    db: asyncpg.Pool,
    redis: Redis,
    scripts: FlashScripts,
    sale_id: int,
    mode: str | None,
    queue_settings: dict[str, Any] | None,
) -> None:
    """Change a live sale's mode and/or queue settings (the keys given replace those keys
    only): PostgreSQL, then the sale hash."""
    async with db.acquire() as conn:
        done = await conn.fetchval(SQL_SET_MODE, sale_id, mode, queue_settings)
        if done is None:
            buckets = await conn.fetchval(SQL_SALE_EXISTS, sale_id)
            if buckets is None:
                raise NotFound("flash sale not found")
            if buckets > 1 and mode == "queued":
                raise ValidationFailed(
                    fields={"mode": "a sale split into buckets cannot be queued"}
                )
            raise SaleEnded
    row = await db.fetchrow(lifecycle.SQL_SALE, sale_id)
    assert row is not None
    await lifecycle.load_sale(redis, scripts, row)


async def run_forever(room: WaitingRoom, stop: asyncio.Event) -> None:
    """Refresh this worker's copy and run the admitter steps, every ``queue_tick_ms``."""

    async def step() -> None:
        await room.refresh()
        await room.admit_all()

    every_s = room.settings.queue_tick_ms / 1000
    await tasks.guarded_loop(step, name="waiting room step", every_s=every_s, stop=stop)
