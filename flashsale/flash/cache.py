"""A flash sale's live state as each worker sees it: ``SaleState`` and the ``SaleCache``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final

from redis.asyncio import Redis

from flashsale.errors import ServiceUnavailable
from flashsale.stores import rediskeys
from flashsale.stores.redisclient import run_id, run_ids
from flashsale.stores.tasks import STORE_ERRORS
from flashsale.timing import SALE_CACHE_MISS_S

BUCKET_FIELDS: Final = ("remaining", "moved_out", "allotment", "armed", "moves")


@dataclass(slots=True)
class SaleState:
    id: int
    sku_id: int
    product_id: int
    price_cents: int
    original_price_cents: int
    name: str
    per_user_limit: int
    start_ms: int
    end_ms: int
    window_ms: int
    allotment: int
    remaining: int
    moved_out: int
    closed: bool
    recovering: bool = False  # not armed under the current Redis run (see reserve.lua)
    mode: str = "open"  # "queued": joins need an admission (flashsale/waitingroom/)
    queue_cfg: bytes = b""  # the sale's own queue settings (JSON), see waitingroom.config
    buckets: int = 1  # >1: split over that many slots (flashsale/flash/buckets.py)
    in_transit: int = 0  # transfers between buckets not credited yet (units on their way)
    moves: dict[int, int] | None = None  # each bucket's `moves` (lua/bucket_give.lua)

    @property
    def sold_out(self) -> bool:
        return self.remaining <= 0 and not self.in_transit

    def status(self, now_ms: int) -> str:
        if self.closed or now_ms >= self.end_ms:
            return "ended"
        if now_ms < self.start_ms:
            return "upcoming"
        return "sold_out" if self.sold_out else "active"

    def public(self, now_ms: int) -> dict[str, Any]:
        sold = max(0, self.allotment - self.remaining - self.moved_out)
        return {
            "flash_sale_id": self.id,
            "product": {
                "id": self.product_id,
                "name": self.name,
                "sku_id": self.sku_id,
                "original_price": self.original_price_cents,
                "flash_price": self.price_cents,
            },
            "total_quantity": self.allotment,
            "sold_quantity": sold,
            "remaining_quantity": self.remaining,
            "per_user_limit": self.per_user_limit,
            "start_time": iso_ms(self.start_ms),
            "end_time": iso_ms(self.end_ms),
            "payment_window_s": self.window_ms // 1000,
            "status": self.status(now_ms),
            "mode": self.mode,
        }

    @classmethod
    def from_hash(cls, sale_id: int, h: dict[Any, Any], run_id: bytes = b"") -> SaleState:
        def i(name: str) -> int:
            return int(h[name.encode()])

        return cls(
            id=sale_id,
            sku_id=i("sku"),
            product_id=i("product"),
            price_cents=i("price"),
            original_price_cents=i("original_price"),
            name=h[b"name"].decode(),
            per_user_limit=i("limit"),
            start_ms=i("start_ms"),
            end_ms=i("end_ms"),
            window_ms=i("window_ms"),
            allotment=i("allotment"),
            remaining=i("remaining"),
            moved_out=i("moved_out"),
            closed=h.get(b"closed") == b"1",
            recovering=bool(run_id) and h.get(b"armed") != run_id,
            mode=h.get(b"mode", b"open").decode(),
            queue_cfg=h.get(b"qcfg", b""),
            buckets=int(h.get(b"buckets", b"1")),
            moves={0: int(h.get(b"moves", b"0"))},
        )

    def fold(self, others: list[tuple[list[Any], bytes]], in_transit: int) -> None:
        """Add the other buckets' counters (``HMGET`` of :data:`BUCKET_FIELDS`, with the
        run id of the server holding each) to bucket 0's: the sale's totals."""
        self.in_transit = in_transit
        for k, ((remaining, moved_out, allotment, armed, moves), run) in enumerate(others, start=1):
            assert self.moves is not None
            self.moves[k] = int(moves or 0)
            self.remaining += int(remaining or 0)
            self.moved_out += int(moved_out or 0)
            self.allotment += int(allotment or 0)
            if run and armed != run:
                self.recovering = True


async def read_state(redis: Redis, sale_id: int, run: bytes = b"") -> SaleState | None:
    """One sale's state, every bucket's counters added up; None if Redis does not know it.
    With ``run`` (the run id of bucket 0's server) it tells whether a bucket is fenced."""
    h = await redis.hgetall(rediskeys.sale(sale_id))
    if not h or b"sku" not in h:
        return None
    state = SaleState.from_hash(sale_id, h, run)
    await fold_buckets(redis, state, check_runs=bool(run))
    return state


async def fold_buckets(redis: Redis, state: SaleState, *, check_runs: bool) -> None:
    """Add a split sale's other buckets to ``state`` (read from bucket 0)."""
    if state.buckets <= 1:
        return
    keys = [rediskeys.sale(state.id, k) for k in range(1, state.buckets)]
    runs = [r.encode() for r in await run_ids(redis, keys)] if check_runs else [b""] * len(keys)
    pipe = redis.pipeline(transaction=False)
    _ask_buckets(pipe, state)
    found = iter(await pipe.execute())
    _fold_replies(state, found, iter(runs))
    await _confirm_sold_out(redis, [state])


async def _confirm_sold_out(redis: Redis, states: list[SaleState]) -> None:
    """A split sale that looks sold out is so only if no unit moved between buckets while
    they were read one after another (each bucket's ``moves`` unchanged): otherwise a unit
    on its way was missed, and the sale counts as having units in transit."""
    empty = [s for s in states if s.sold_out and s.moves]
    if not empty:
        return
    pipe = redis.pipeline(transaction=False)
    for s in empty:
        for k in range(s.buckets):
            pipe.hget(rediskeys.sale(s.id, k), "moves")
    found = iter(await pipe.execute())
    for s in empty:
        assert s.moves is not None
        now = [int(next(found) or 0) for _ in range(s.buckets)]
        if now != [s.moves[k] for k in range(s.buckets)]:
            s.in_transit = 1


def _ask_buckets(pipe: Any, state: SaleState) -> None:
    for k in range(state.buckets):
        if k:
            pipe.hmget(rediskeys.sale(state.id, k), BUCKET_FIELDS)
        pipe.hlen(rediskeys.transfers_out(state.id, k))


def _fold_replies(state: SaleState, found: Iterator[Any], runs: Iterator[bytes]) -> None:
    others: list[tuple[list[Any], bytes]] = []
    in_transit = 0
    for k in range(state.buckets):
        if k:
            others.append((next(found), next(runs)))
        in_transit += int(next(found))
    state.fold(others, in_transit)


_SECONDS: dict[int, str] = {}
# seconds formatted and kept: a poll answers two (when its ticket entered, when the sale
# starts), a stampede's answers a few; a crowd's entry times spread over minutes
_SECONDS_KEPT: Final = 4096


def iso_ms(ms: int) -> str:
    """Epoch milliseconds as an ISO 8601 UTC timestamp ending in ``Z``, spelt as
    ``datetime.isoformat`` spells it (``.mmm000`` for milliseconds, none when zero).

    Every accepted join answers its payment deadline, and a stampede's deadlines fall in
    the same few seconds: each second's date and time are formatted once (a dict lookup
    where building a datetime each time took 3.8 µs, timeit). One remembered second was
    not enough: a queue poll's two timestamps fell in different seconds and missed twice
    (7 µs of a 58 µs poll, py-spy under `profile_join --scenario poll`)."""
    second, millis = divmod(ms, 1000)
    prefix = _SECONDS.get(second)
    if prefix is None:
        if len(_SECONDS) >= _SECONDS_KEPT:
            _SECONDS.clear()
        prefix = _SECONDS[second] = datetime.fromtimestamp(second, UTC).strftime(
            "%Y-%m-%dT%H:%M:%S"
        )
    return f"{prefix}.{millis:03d}000Z" if millis else f"{prefix}Z"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class SaleCache:
    """Every known sale's state, refreshed from Redis twice a second in each worker.

    Joins check the window and the sold-out flag here without any I/O; a script that
    reports sold out sets the flag at once in this worker, and the refresh spreads
    it (and its clearing after a top-up or a release) to every worker within a second.
    """

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self.sales: dict[int, SaleState] = {}
        self._misses: dict[int, float] = {}
        self._loading: dict[int, asyncio.Future[SaleState | None]] = {}
        # the run id of the server holding each sale (one server, or a cluster's primaries)
        self.run_ids: dict[int, bytes] = {}

    async def refresh(self) -> None:
        ids = sorted(int(x) for x in await self._redis.smembers(rediskeys.SALES_INDEX))
        if not ids:
            self.sales = {}
            return
        keys = [rediskeys.sale(sale_id) for sale_id in ids]
        runs = await run_ids(self._redis, keys)
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        hashes = await pipe.execute()
        fresh: dict[int, SaleState] = {}
        for sale_id, h, run in zip(ids, hashes, runs, strict=True):
            self.run_ids[sale_id] = run.encode()
            if h and b"sku" in h:
                fresh[sale_id] = SaleState.from_hash(sale_id, h, self.run_ids[sale_id])
        split = [s for s in fresh.values() if s.buckets > 1]
        if split:  # one more round trip, for sales spread over several slots only
            keys = [rediskeys.sale(s.id, k) for s in split for k in range(1, s.buckets)]
            bruns = iter([r.encode() for r in await run_ids(self._redis, keys)])
            pipe = self._redis.pipeline(transaction=False)
            for s in split:
                _ask_buckets(pipe, s)
            found = iter(await pipe.execute())
            for s in split:
                _fold_replies(s, found, bruns)
            await _confirm_sold_out(self._redis, split)
        self.sales = fresh

    async def get(self, sale_id: int) -> SaleState | None:
        state = self.sales.get(sale_id)
        if state is not None:
            return state
        missed = self._misses.get(sale_id)
        if missed is not None and time.monotonic() - missed < SALE_CACHE_MISS_S:
            return None
        # One read per sale however many joins wait for it: a worker that does not know a
        # sale yet (just started, the sale just created) meets its stampede with one
        # lookup, not one per join — a thousand at once emptied the client's pool, and a
        # quarter of them were told the store was unavailable.
        loading = self._loading.get(sale_id)
        if loading is None:
            loading = asyncio.ensure_future(self._load(sale_id))
            self._loading[sale_id] = loading
            loading.add_done_callback(partial(self._loaded, sale_id))
        return await asyncio.shield(loading)

    def _loaded(self, sale_id: int, loading: asyncio.Future[SaleState | None]) -> None:
        self._loading.pop(sale_id, None)
        if not loading.cancelled():
            loading.exception()  # retrieved: every waiter may have gone (their 503 is theirs)

    async def _load(self, sale_id: int) -> SaleState | None:
        try:
            h = await self._redis.hgetall(rediskeys.sale(sale_id))
            if not h or b"sku" not in h:
                if len(self._misses) > 10_000:
                    self._misses.clear()
                self._misses[sale_id] = time.monotonic()
                return None
            run = self.run_ids.get(sale_id)
            if run is None:
                run = self.run_ids[sale_id] = (
                    await run_id(self._redis, rediskeys.sale(sale_id))
                ).encode()
            state = SaleState.from_hash(sale_id, h, run)
            await fold_buckets(self._redis, state, check_runs=True)
        except STORE_ERRORS as exc:
            # e.g. a cluster client still aiming at a primary that just died: a retriable 503
            raise ServiceUnavailable("the sale store is unavailable; retry later") from exc
        self.sales[sale_id] = state
        return state

    def mark_sold_out(self, sale_id: int) -> None:
        state = self.sales.get(sale_id)
        if state is not None:
            state.remaining = 0
