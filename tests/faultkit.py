"""Fault injection on real processes: a valkey, a broker, gateway workers and a consumer
started apart, killed, stopped and restarted; shoppers that record every answer.

The stack's PostgreSQL is the suite's (a fault case that stops PostgreSQL starts its own).
Each shopper joins once with an Idempotency-Key and retries while the answer is not
final (503, 429, a reset connection), as the README tells clients to; what it was told
last is what the checks hold the stores to.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import RedisError

from consumers import reconcile
from consumers.recovery import server_run_id
from flashsale.auth import TokenService
from flashsale.settings import Settings
from flashsale.stores import rediskeys
from flashsale.stores.db import create_pool, migrate
from flashsale.stores.redisclient import leaks_as_connection_errors
from stack.embedded import (
    Server,
    ValkeyCluster,
    free_port,
    start_kafka,
    start_postgres,
    start_redis,
    start_redis_cluster,
)

FINAL_REFUSALS = {"SOLD_OUT", "INSUFFICIENT_STOCK", "SALE_ENDED"}


@dataclass
class Proc:
    """A project process (``python -m stack <command>``) we can kill and start again."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stack", *self.args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def child_pids(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return sorted(out)


def aof_tail(data_dir: Path) -> tuple[Path, int]:
    """The newest incremental AOF file of a valkey data folder and its size now."""
    files = sorted(
        (data_dir / "appendonlydir").glob("*.incr.aof"),
        key=lambda p: int(p.name.split(".")[-3]),
    )
    assert files, f"no AOF in {data_dir}"
    return files[-1], files[-1].stat().st_size


@dataclass
class FaultStack:
    """valkey + broker of its own, the suite's PostgreSQL, gateway and consumer processes."""

    root: Path
    settings: Settings
    redis_server: Server | ValkeyCluster
    kafka_server: Server
    gateway: Proc
    consumer: Proc
    logs: list[Path] = field(default_factory=list)

    @classmethod
    def start(
        cls, base: Settings, root: Path, tag: str, *, redis_shards: int = 0, **changes: Any
    ) -> FaultStack:
        """``redis_shards`` > 0: a valkey cluster of that many primaries (one replica each,
        a silent primary replaced after 1s) and one WAIT per batch of reservations."""
        redis_server: Server | ValkeyCluster
        if redis_shards:
            redis_server = start_redis_cluster(
                root / "redis", shards=redis_shards, persist=False, node_timeout_ms=1000
            )
            changes = {"redis_cluster": True, "redis_wait_replicas": 1, **changes}
        else:
            redis_server = start_redis(root / "redis")
        kafka_server = start_kafka(root / "kafka")
        settings = base.with_(
            redis_url=redis_server.url,
            kafka_bootstrap=kafka_server.url,
            kafka_orders_topic=f"{base.kafka_orders_topic}.{tag}",
            kafka_dlq_topic=f"{base.kafka_dlq_topic}.{tag}",
            kafka_consumer_group=f"{base.kafka_consumer_group}-{tag}",
            kafka_produce_timeout_ms=2000,
            kafka_session_timeout_ms=6000,
            kafka_heartbeat_interval_ms=1000,
            data_dir=str(root),
            http_port=free_port(),
            workers=2,
            metrics_port=0,
            stranded_after_s=2,
            claim_stale_s=3,
            sweep_interval_ms=200,
            rate_user_per_s=1000.0,
            rate_user_burst=1000,
            rate_ip_per_s=1e6,
            rate_ip_burst=1_000_000,
            access_log=False,
            **changes,
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
        env.update(settings.to_env())
        gateway = Proc("gateway", ["serve"], env, root / "gateway.log").start()
        consumer = Proc("consumer", ["consume"], env, root / "consumer.log").start()
        return cls(root, settings, redis_server, kafka_server, gateway, consumer)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.http_port}"

    async def ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                try:
                    async with http.get(self.base_url + "/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        raise AssertionError("the gateway did not become ready:\n" + self.log_tail())

    def kill_redis(self) -> None:
        assert isinstance(self.redis_server, Server)
        self.redis_server.proc.send_signal(signal.SIGKILL)
        self.redis_server.proc.wait(10)

    def start_redis_again(self) -> None:
        assert isinstance(self.redis_server, Server)
        self.redis_server = start_redis(self.root / "redis", port=self.redis_server.port)

    def kill_primary_of(self, key: str) -> Server:
        """SIGKILL the cluster node serving ``key``; returns it."""
        assert isinstance(self.redis_server, ValkeyCluster)
        primary = self.redis_server.primary_for(key)
        primary.proc.send_signal(signal.SIGKILL)
        primary.proc.wait(10)
        return primary

    async def reconfigure(self, **changes: Any) -> None:
        """Stop the gateway and the consumer, start them again with ``changes`` to the
        settings (e.g. another ``redis_url``), and wait until every gateway worker listens."""
        self.gateway.stop()
        self.consumer.stop(30)
        self.settings = self.settings.with_(**changes)
        env = {**self.gateway.env, **self.settings.to_env()}
        log = self.gateway.log_path
        mark = log.stat().st_size if log.exists() else 0
        self.gateway = Proc("gateway", ["serve"], env, log).start()
        self.consumer = Proc("consumer", ["consume"], env, self.consumer.log_path).start()
        await self.ready()

        def listening() -> int:
            with log.open("rb") as f:
                f.seek(mark)
                return f.read().count(b" listening on ")

        await when(lambda: listening() >= self.settings.workers)

    def restart_kafka(self) -> None:
        """A memory-only broker restarted: everything not yet consumed is gone."""
        self.kafka_server.stop()
        self.kafka_server = start_kafka(self.root / "kafka", port=self.kafka_server.port)

    def stop(self) -> None:
        self.gateway.stop()
        self.consumer.stop(30)
        self.kafka_server.stop()
        self.redis_server.stop()

    def unhandled(self, n: int = 6000) -> str:
        """The gateway's "unhandled error" log lines with what follows each (the 500s'
        tracebacks), so a failed run names its cause after its folder is gone."""
        path = self.gateway.log_path
        if not path.exists():
            return ""
        text = path.read_text(errors="replace")
        found = [text[i : i + 2000] for i in _starts(text, "unhandled error")]
        return "\n...\n".join(found)[:n]

    def log_tail(self, n: int = 3000) -> str:
        out = []
        for p in (self.gateway.log_path, self.consumer.log_path):
            if p.exists():
                out.append(f"--- {p.name}\n" + p.read_text(errors="replace")[-n:])
        return "\n".join(out)


@dataclass
class Answers:
    """What each shopper was told last."""

    accepted: dict[int, str] = field(default_factory=dict)  # user → order id it was given
    refused: dict[int, str] = field(default_factory=dict)  # user → final error code
    unknown: set[int] = field(default_factory=set)  # no final answer before the deadline
    retries: int = 0
    statuses: dict[str, int] = field(default_factory=dict)

    def saw(self, what: str) -> None:
        self.statuses[what] = self.statuses.get(what, 0) + 1


async def stampede(
    base_url: str,
    sale_id: int,
    shoppers: list[tuple[int, str]],
    answers: Answers,
    *,
    per_second: float = 400.0,
    deadline_s: float = 60.0,
    concurrency: int = 100,
) -> None:
    """Every shopper joins once for one unit, retrying until a final answer."""
    url = f"{base_url}/api/v1/flash-sales/{sale_id}/join"
    limit = asyncio.Semaphore(concurrency)
    stop_at = time.monotonic() + deadline_s

    async def one(http: aiohttp.ClientSession, uid: int, token: str) -> None:
        headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": f"fault-{uid}"}
        while time.monotonic() < stop_at:
            try:
                async with limit, http.post(url, json={"quantity": 1}, headers=headers) as resp:
                    status = resp.status
                    body = await resp.json(content_type=None)
                    told_when = "Retry-After" in resp.headers
            except (TimeoutError, aiohttp.ClientError, ValueError):
                answers.saw("connection error")
                answers.retries += 1
                await asyncio.sleep(0.2 + random.random() * 0.2)
                continue
            code = body.get("error") or str(status)
            answers.saw(f"{status} {code}")
            if status == 202:
                answers.accepted[uid] = body["data"]["order_id"]
                return
            if (
                status == 409
                and code == "LIMIT_EXCEEDED"
                and (body.get("data") or {}).get("order_id")
            ):
                # an earlier attempt's outcome was unknown; this says it was a yes
                answers.accepted[uid] = body["data"]["order_id"]
                return
            if status == 409 and code in FINAL_REFUSALS:
                answers.refused[uid] = code
                return
            if status in (429, 503):
                if not told_when:
                    answers.saw(f"{status} {code} without Retry-After")
                answers.retries += 1
                await asyncio.sleep(0.2 + random.random() * 0.3)
                continue
            raise AssertionError(f"unexpected answer {status} {body}")
        answers.unknown.add(uid)

    timeout = aiohttp.ClientTimeout(total=15)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        tasks = []
        for uid, token in shoppers:
            tasks.append(asyncio.create_task(one(http, uid, token)))
            await asyncio.sleep(1 / per_second)
        await asyncio.gather(*tasks)


async def crowd_until(
    stack: FaultStack,
    sale_id: int,
    shoppers: list[tuple[int, str]],
    *,
    per_second: float,
    accepted: int,
    deadline_s: float = 60.0,
) -> tuple[Answers, asyncio.Task[None]]:
    """Start the crowd on ``stack``'s gateway; return once ``accepted`` shoppers have a 202
    (the moment to inject a fault), with the crowd still running (each shopper retrying
    until ``deadline_s`` after the crowd's start)."""
    answers = Answers()
    crowd = asyncio.create_task(
        stampede(
            stack.base_url,
            sale_id,
            shoppers,
            answers,
            per_second=per_second,
            deadline_s=deadline_s,
        )
    )
    await when(lambda: len(answers.accepted) >= accepted)
    return answers, crowd


async def when(
    check: Callable[[], bool],
    timeout_s: float = 60.0,
    explain: Callable[[], str] = lambda: "",
) -> None:
    """Wait for ``check()``; a timeout fails with what ``explain()`` says of the moment."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in time {explain()}".rstrip())
        await asyncio.sleep(0.02)


# the units of a sale's live orders in PostgreSQL: what ``flash_sales.sold_quantity`` counts
SQL_LIVE_UNITS = """
SELECT coalesce(sum(i.quantity), 0)::int
FROM orders o JOIN order_items i ON i.order_id = o.id
WHERE o.flash_sale_id = $1 AND o.status NOT IN ('cancelled', 'oversold')
"""
# the bound a fault case gives the stores to converge after the fault, unless it says more
SETTLE_TIMEOUT_S = 90.0


@dataclass
class Verdict:
    """The promises, measured after a fault."""

    fault: str
    accepted: int
    persisted: int
    lost: list[str]
    oversold: int
    duplicates: int
    sold: int
    quantity: int
    extra: int
    converge_s: float
    live_units: int = 0  # units of the live orders in PostgreSQL (= sold once converged)

    def row(self) -> str:
        return (
            f"| {self.fault} | {self.accepted} | {self.persisted} | {len(self.lost)} | "
            f"{self.oversold} | {self.duplicates} | {self.converge_s:.1f}s |"
        )


@dataclass
class Settled:
    """One look at a sale after a fault: what convergence waits for."""

    missing: list[str]  # accepted orders not (yet) in PostgreSQL
    in_flight: int | None  # reservation log + claims in Redis; None: Redis did not answer
    reconcile: str  # the reconcile line, or why it could not run
    clean: bool
    sold: int
    live_units: int

    @property
    def converged(self) -> bool:
        return (
            not self.missing and self.in_flight == 0 and self.clean and self.sold == self.live_units
        )

    def describe(self) -> str:
        return (
            f"accepted not in PostgreSQL: {len(self.missing)} {self.missing[:5]}; "
            f"in flight: {'Redis unreachable' if self.in_flight is None else self.in_flight}; "
            f"sold_quantity={self.sold} vs live order units={self.live_units}; "
            f"reconcile: {self.reconcile}"
        )


async def look(db: asyncpg.Pool, redis: Redis, sale_id: int, promised: set[str]) -> Settled:
    """The sale's state in both stores, for :func:`settle_and_judge`."""
    ids = {
        r["id"] for r in await db.fetch("SELECT id FROM orders WHERE flash_sale_id = $1", sale_id)
    }
    sale = await db.fetchrow("SELECT * FROM flash_sales WHERE id = $1", sale_id)
    assert sale is not None
    live_units = int(await db.fetchval(SQL_LIVE_UNITS, sale_id))
    in_flight: int | None = 0
    try:
        with leaks_as_connection_errors():
            for k in range(sale["buckets"]):  # every bucket of a split sale
                for key in (rediskeys.log(sale_id, k), rediskeys.claimed(sale_id, k)):
                    in_flight = (in_flight or 0) + await redis.hlen(key)
            report = await reconcile.check_sale(
                db, redis, sale, run_id=await server_run_id(redis, sale_id)
            )
        line, clean = report.line(), report.ok
    except (RedisError, OSError) as exc:  # mid-failover: not converged yet
        in_flight, line, clean = None, f"Redis did not answer: {exc!r}", False
    return Settled(
        missing=sorted(promised - ids),
        in_flight=in_flight,
        reconcile=line,
        clean=clean,
        sold=int(sale["sold_quantity"]),
        live_units=live_units,
    )


async def settle_and_judge(
    fault: str,
    db: asyncpg.Pool,
    redis: Redis,
    sale_id: int,
    answers: Answers,
    started: float,
    *,
    timeout_s: float = SETTLE_TIMEOUT_S,
    stack: FaultStack | None = None,
) -> Verdict:
    """Wait until the stores converged (every accepted order in PostgreSQL, nothing in
    flight, reconcile clean, ``sold_quantity`` equal to the units of the live orders), then
    measure. Convergence is itself a promise: if it is not reached within ``timeout_s``, this
    fails with the state it was left in (and the logs of ``stack``), never a verdict taken
    anyway."""
    promised = set(answers.accepted.values())
    deadline = time.monotonic() + timeout_s
    while not (state := await look(db, redis, sale_id, promised)).converged:
        if time.monotonic() > deadline:
            tail = stack.log_tail() if stack is not None else ""
            raise AssertionError(
                f"{fault}: the stores did not converge within {timeout_s:.0f}s of settling "
                f"({answers.statuses}): {state.describe()}\n{tail}"
            )
        await asyncio.sleep(0.25)
    converge = time.monotonic() - started
    rows = await db.fetch("SELECT id, status FROM orders WHERE flash_sale_id = $1", sale_id)
    ids = {r["id"] for r in rows}
    sale = await db.fetchrow("SELECT quantity FROM flash_sales WHERE id = $1", sale_id)
    assert sale is not None
    return Verdict(
        fault=fault,
        accepted=len(promised),
        persisted=len(promised & ids),
        lost=sorted(promised - ids),
        oversold=sum(1 for r in rows if r["status"] == "oversold"),
        duplicates=len(answers.accepted) - len(promised),  # two shoppers told one order id
        sold=state.sold,
        quantity=int(sale["quantity"]),
        extra=len(ids - promised),
        converge_s=converge,
        live_units=state.live_units,
    )


def _starts(text: str, needle: str) -> list[int]:
    out: list[int] = []
    at = text.find(needle)
    while at >= 0 and len(out) < 5:
        out.append(max(0, text.rfind("\n", 0, at) + 1))
        at = text.find(needle, at + len(needle))
    return out


def assert_promises_kept(v: Verdict, answers: Answers, stack: FaultStack | None = None) -> None:
    tail = stack.log_tail() if stack is not None else ""
    print(v.row(), answers.statuses, flush=True)
    errors = [s for s in answers.statuses if s.startswith("500")]
    assert not errors, f"{answers.statuses}\n{stack.unhandled() if stack is not None else ''}"
    assert not v.lost, f"accepted orders not in PostgreSQL: {v.lost[:10]}\n{tail}"
    assert v.oversold == 0, f"{v.oversold} order(s) oversold\n{tail}"
    assert v.duplicates == 0
    assert v.accepted <= v.quantity
    assert v.sold <= v.quantity
    assert v.sold == v.live_units, f"sold {v.sold} != {v.live_units} units of live orders"
    # an order nobody was told about may exist only for a shopper left without an answer
    assert v.extra <= len(answers.unknown), (v.extra, answers.unknown)


async def sale_and_shoppers(
    client_base: str,
    db: asyncpg.Pool,
    tokens: TokenService,
    *,
    quantity: int,
    shoppers: int,
    admin_headers: Callable[[], Awaitable[dict[str, str]]],
    make_sku: Callable[[], Awaitable[int]],
    make_users: Callable[[int], Awaitable[list[int]]],
    buckets: int = 1,
) -> tuple[int, list[tuple[int, str]]]:
    from tests.flashkit import create_sale_over_http

    async with aiohttp.ClientSession() as http:
        sale_id = await create_sale_over_http(
            http, client_base, await admin_headers(), await make_sku(), quantity, buckets=buckets
        )
    users = await make_users(shoppers)
    return sale_id, [(u, tokens.issue(u, "user")) for u in users]


def kill_postgres(server: Server) -> None:
    """SIGKILL the postmaster, then every backend it left (they would notice late)."""
    backends = child_pids(server.proc.pid)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    for pid in backends:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def shop_rows(pool: asyncpg.Pool) -> tuple[int, int]:
    """A category and a product on sale with one SKU: (product id, sku id)."""
    merchant = await pool.fetchval(
        "INSERT INTO users (email, password_hash, nickname, role) "
        "VALUES ($1, 'x', 'm', 'merchant') RETURNING id",
        f"m-{secrets.token_hex(5)}@test.local",
    )
    category = await pool.fetchval(
        "INSERT INTO categories (name) VALUES ($1) RETURNING id", "cat-" + secrets.token_hex(4)
    )
    product = await pool.fetchval(
        "INSERT INTO products (merchant_id, category_id, name, status) "
        "VALUES ($1, $2, 'Lamp', 'on_sale') RETURNING id",
        merchant,
        category,
    )
    sku = await pool.fetchval(
        "INSERT INTO skus (product_id, price_cents, on_hand) VALUES ($1, 1999, 100000) "
        "RETURNING id",
        product,
    )
    return int(product), int(sku)


async def own_shop(root: Path) -> tuple[Server, int, int, int]:
    """A PostgreSQL of the test's own, migrated, with a product, its SKU and a shopper."""
    pg = start_postgres(root / "pg", durable=True)
    pool = await create_pool(pg.url, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
        product, sku = await shop_rows(pool)
        uid = await pool.fetchval(
            "INSERT INTO users (email, password_hash, nickname) VALUES ($1, 'x', 'u') RETURNING id",
            f"u-{secrets.token_hex(5)}@test.local",
        )
    finally:
        await pool.close()
    return pg, product, sku, int(uid)


async def leaked_transport_error() -> RuntimeError:
    """What redis-py 8.1 raises on uvloop when another task closed the connection's
    transport under a write (redis/redis-py#4287: a cluster client reinitialising after a
    failover does it): a RuntimeError "the handler is closed", not its ConnectionError.
    Made here by that very race, on a real connection."""
    accepted: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda _r, w: accepted.append(w), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = Connection(host="127.0.0.1", port=port)
    conn._reader, conn._writer = reader, writer  # what connect() sets up
    writer.transport.close()  # what a concurrent disconnect() does
    await asyncio.sleep(0)
    try:
        await conn._send_packed_command([b"*1\r\n$4\r\nPING\r\n"])
    except RuntimeError as exc:
        return exc
    finally:
        await conn.disconnect(nowait=True)
        for w in accepted:
            w.close()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)  # let the closed handles be released before the loop ends
    raise AssertionError("a write on a closed transport raised nothing")
