"""The load-test tooling: generator, baseline, minting, invariants, Locust scenario runs.

Locust runs only as a subprocess (gevent must never be imported into pytest), each
for a few seconds. Nothing here asserts a speed; the benchmark prints those.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import csv
import http.server
import os
import re
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis import Redis as SyncRedis

from flashsale.auth import TokenService
from flashsale.settings import Settings
from loadtests import (
    bench,
    invariants,
    loadgen,
    mint,
    naive_peer,
    queue_report,
    redis_ceiling,
    scenario_support,
)
from loadtests.invariants import Outcomes, PersistedOrder
from stack import stackfile
from stack.embedded import free_port
from stack.processes import child_env, stop_children

REPO = Path(__file__).resolve().parent.parent
LOCUST = str(Path(sys.executable).with_name("locust"))


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not come up")


def _start(
    args: list[str], env: dict[str, str], url_path: str, port: int
) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(args, env=env, cwd=REPO)
    try:
        _wait_http(f"http://127.0.0.1:{port}{url_path}", proc)
    except BaseException:
        stop_children([proc])
        raise
    return proc


def _request(method: str, url: str, token: str, body: Any = None) -> tuple[int, Any]:
    req = urllib.request.Request(
        url,
        method=method,
        data=None if body is None else orjson.dumps(body),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def ceiling_port() -> Iterator[int]:
    port = free_port()
    proc = _start(
        [sys.executable, "-m", "loadtests.ceiling", "--port", str(port), "--workers", "2"],
        dict(os.environ),
        "/",
        port,
    )
    yield port
    stop_children([proc])


@pytest.fixture
def tokens_file(tmp_path: Path, tokens: TokenService) -> Path:
    path = tmp_path / "tokens.txt"
    mint.write_tokens(path, [tokens.issue(900_000 + i, "user") for i in range(50)])
    return path


# ---------------------------------------------------------------- load generator


@pytest.mark.slow
def test_python_loadgen_counts_requests_against_the_ceiling(
    ceiling_port: int, tokens_file: Path
) -> None:
    run = loadgen.run_python(
        "/x",
        ceiling_port,
        tokens_file=tokens_file,
        method="POST",
        body=b'{"quantity": 1}',
        processes=2,
        connections=8,
        duration_s=1.0,
        max_requests=3000,
    )
    assert run.requests > 0
    assert run.errors == 0
    assert set(run.statuses) == {"200"}
    assert 0 < run.p50_ms <= run.p99_ms
    assert 0 < run.generator_cpu_s < 3.0  # two processes for 1 s: its own CPU, not its start


@pytest.mark.slow
def test_python_loadgen_rate_mode_and_outcome_recording(ceiling_port: int, tmp_path: Path) -> None:
    record = tmp_path / "outcomes"
    run = loadgen.run_python(
        "/x",
        ceiling_port,
        tokens_file=None,
        processes=2,
        connections=4,
        duration_s=1.0,
        max_requests=100,
        rate=200,
        record=record,
    )
    assert run.requests > 0 and run.errors == 0
    outcomes = invariants.read_outcomes(sorted(tmp_path.glob("outcomes.*")))
    assert outcomes.offered == run.requests
    assert not outcomes.rejected  # the ceiling answers 200 with a data object


@pytest.mark.slow
def test_wrk_counts_requests_against_the_ceiling(ceiling_port: int, tokens_file: Path) -> None:
    if loadgen.wrk_binary(install=False) is None:
        pytest.skip("wrk is not installed")
    run = loadgen.run_wrk(
        "/x",
        ceiling_port,
        tokens_file=tokens_file,
        method="POST",
        body=b'{"quantity": 1}',
        threads=2,
        connections=8,
        duration_s=1,
        max_requests=2000,
    )
    assert run.requests > 0
    assert run.errors == 0
    assert set(run.statuses) == {"200"}
    assert run.generator_cpu_s > 0  # wrk's own CPU, read when it was waited for


def test_percentile_of_a_histogram() -> None:
    from collections import Counter

    hist = Counter({0: 50, 9: 49, 99: 1})  # 10 us buckets
    assert loadgen._percentile(hist, 0.5) == pytest.approx(0.01)
    assert loadgen._percentile(hist, 0.99) == pytest.approx(0.1)
    assert loadgen._percentile(Counter(), 0.99) == 0.0


# ---------------------------------------------------------------- redis-benchmark runner


@pytest.mark.slow
def test_redis_benchmark_runs_a_script_by_evalsha(base_settings: Settings, tmp_path: Path) -> None:
    script = tmp_path / "incr.lua"
    script.write_text("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    port = int(base_settings.redis.rsplit(":", 1)[1].split("/")[0])
    tag = "lt:{bench-" + secrets.token_hex(4) + "}:"
    results = redis_ceiling.run_script(
        base_settings.redis,
        port,
        script,
        [tag + "__rand_int__"],
        ["1"],
        requests=2000,
        clients=4,
    )
    assert [r.pipeline for r in results] == [1, 16]
    assert all(r.errors == 0 for r in results)
    client = SyncRedis.from_url(base_settings.redis)
    try:  # every one of the 2 x 2000 calls ran the script once
        keys = list(client.scan_iter(match=tag + "*", count=1000))
        values = [int(v) for v in client.mget(keys) if v is not None]
        assert sum(values) == 4000
        client.delete(*keys)
    finally:
        client.close()


# ---------------------------------------------------------------- the naive baseline


@pytest.fixture(scope="module")
async def naive_client(base_settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    conn = await asyncpg.connect(base_settings.database)
    try:
        await naive_peer.setup_schema(conn)
    finally:
        await conn.close()
    async with TestClient(TestServer(naive_peer.create_app(base_settings))) as c:
        yield c


async def test_naive_peer_never_oversells(
    naive_client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    stock, buyers = 10, 60
    async with db.acquire() as conn:
        sale_id = await naive_peer.create_sale(conn, stock)

    async def join(user_id: int) -> int:
        resp = await naive_client.post(
            f"/api/v1/flash-sales/{sale_id}/join",
            json={"quantity": 1},
            headers={"Authorization": f"Bearer {tokens.issue(user_id, 'user')}"},
        )
        await resp.read()
        return resp.status

    statuses = await asyncio.gather(*(join(1000 + i) for i in range(buyers)))
    assert statuses.count(202) == stock
    assert statuses.count(409) == buyers - stock
    assert await db.fetchval(naive_peer.SQL_COUNT_ORDERS, sale_id) == stock
    assert await db.fetchval("SELECT stock FROM naive_sales WHERE id = $1", sale_id) == 0


async def test_naive_peer_requires_a_token(naive_client: TestClient[Any, Any]) -> None:
    resp = await naive_client.post("/api/v1/flash-sales/1/join", json={"quantity": 1})
    assert resp.status == 401
    assert (await resp.json())["error"] == "AUTH_REQUIRED"


# ---------------------------------------------------------------- minting


async def test_mint_inserts_users_with_one_hash_and_valid_tokens(
    db: asyncpg.Pool, tokens: TokenService
) -> None:
    async with db.acquire() as conn:
        ids = await mint.insert_users(conn, 120)
    assert len(set(ids)) == 120
    hashes = await db.fetchval(
        "SELECT count(DISTINCT password_hash) FROM users WHERE id = ANY($1::bigint[])", ids
    )
    assert hashes == 1
    issued = mint.issue_tokens(tokens, ids[:3])
    assert [tokens.verify(t).user_id for t in issued] == ids[:3]


# ---------------------------------------------------------------- invariants


def test_invariants_on_a_hand_made_data_set(tmp_path: Path) -> None:
    (tmp_path / "out.1").write_text(
        "accepted\t101\naccepted\t102\nrejected\tSOLD_OUT\nrejected\tSOLD_OUT\n"
    )
    (tmp_path / "out.2").write_text(
        "accepted\t103\naccepted\t103\nrejected\tLIMIT_EXCEEDED\naccepted\t104\n"
    )
    outcomes = invariants.read_outcomes(invariants.expand([str(tmp_path / "out.*")]))
    assert outcomes.offered == 8
    persisted = [
        PersistedOrder("101", 1, "pending_payment", 1),
        PersistedOrder("102", 2, "paid", 1),
        PersistedOrder("103", 3, "pending_payment", 1),
        PersistedOrder("105", 3, "pending_payment", 1),  # user 3 twice with limit 1
        PersistedOrder("106", 5, "cancelled", 1),  # returned its unit
    ]
    report = invariants.summarize(outcomes, persisted, total_quantity=3, per_user_limit=1)
    assert report.accepted == 5
    assert report.rejected == {"SOLD_OUT": 2, "LIMIT_EXCEEDED": 1}
    assert report.orders_in_pg == 5
    assert report.orders_other == 2  # 105 and 106: joins the outcome files do not hold
    assert any("3 from the outcome files, 2 other joins" in line for line in report.lines())
    assert report.units_live == 4
    assert report.oversold == 1
    assert report.lost == 1  # 104
    assert report.duplicates == 2  # order 103 accepted twice + user 3 over the limit
    assert not report.ok
    assert any(line.startswith("oversold") for line in report.lines())

    clean = invariants.summarize(
        Outcomes(offered=2, accepted=["101"]), persisted[:1], total_quantity=1, per_user_limit=1
    )
    assert clean.ok and clean.oversold == clean.lost == clean.duplicates == 0


# ---------------------------------------------------------------- bench helpers


def test_benchmarks_md_section_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nintro\n")
    bench.write_markdown("first table", "full", path)
    bench.write_markdown("quick table", "quick", path)
    bench.write_markdown("second table", "full", path)
    text = path.read_text()
    assert "intro" in text and "quick table" in text and "second table" in text
    assert "first table" not in text
    assert text.count("<!-- bench:full:begin -->") == 1


# ---------------------------------------------------------------- Locust scenario runs

# Every request each scenario's docstring names (method, name in Locust's statistics).
STAMPEDE_REQUESTS = {
    ("GET", "/api/v1/flash-sales/[id]"),
    ("POST", "/api/v1/flash-sales/[id]/join"),
    ("GET", "/api/v1/orders/[id]"),
    ("POST", "/api/v1/orders/[id]/pay"),
}
STOREFRONT_REQUESTS = {
    ("GET", "/api/v1/products"),
    ("GET", "/api/v1/products?q="),
    ("GET", "/api/v1/products/[id]"),
    ("POST", "/api/v1/cart/items"),
    ("PUT", "/api/v1/cart/items/[id]"),
    ("POST", "/api/v1/cart/checkout"),
    ("POST", "/api/v1/orders/[id]/pay"),
}
_DOC_REQUEST = re.compile(r"\b(GET|POST|PUT|PATCH|DELETE) +(/api/v1/[^\s`]+)")


@dataclass
class LocustRun:
    """One bounded headless run and what Locust's own CSV statistics say about it."""

    proc: subprocess.CompletedProcess[str]
    requests: dict[tuple[str, str], int]
    failures: list[dict[str, str]]
    history: list[dict[str, str]]

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    def explain(self) -> str:
        return f"failures: {self.failures}\nstderr: {self.proc.stderr[-3000:]}"


def _csv_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _locust(
    locustfile: str,
    port: int,
    tmp_path: Path,
    extra_env: dict[str, str],
    users: int = 5,
    run_time_s: int = 5,
    processes: int = 0,
    host_from_stack: bool = False,
) -> LocustRun:
    """A bounded headless run with CSV statistics (and their per-second history).

    ``host_from_stack``: no ``-H``; the gateway is found as a user finds it while
    ``flashsale up`` runs, from the stack file in the data folder."""
    prefix = tmp_path / Path(locustfile).stem
    env = {**os.environ, **extra_env}
    if host_from_stack:
        data_dir = tmp_path / "data"
        data_dir.mkdir()
        stackfile.write(Settings.from_env().with_(data_dir=str(data_dir), http_port=port), {})
        env["FLASHSALE_DATA_DIR"] = str(data_dir)  # the file names this (live) process
    args = [
        LOCUST,
        "-f",
        str(REPO / "loadtests" / locustfile),
        "--headless",
        "-t",
        f"{run_time_s}s",
        "-u",
        str(users),
        "-r",
        str(users),
        *([] if host_from_stack else ["-H", f"http://127.0.0.1:{port}"]),
        "--csv",
        str(prefix),
        "--csv-full-history",
        "--html",
        str(prefix) + ".html",
        "--only-summary",
        "--stop-timeout",
        "2",
    ]
    if processes:
        args += ["--processes", str(processes)]
    proc = subprocess.run(
        args, env=env, cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    requests = {
        (row["Type"], row["Name"]): int(row["Request Count"])
        for row in _csv_rows(Path(f"{prefix}_stats.csv"))
        if row["Name"] != "Aggregated"
    }
    return LocustRun(
        proc,
        requests,
        _csv_rows(Path(f"{prefix}_failures.csv")),
        _csv_rows(Path(f"{prefix}_stats_history.csv")),
    )


def _docstring_requests(locustfile: str) -> set[tuple[str, str]]:
    """The (method, name) pairs the locustfile's docstring names."""
    source = (REPO / "loadtests" / locustfile).read_text(encoding="utf-8")
    doc = " ".join((ast.get_docstring(ast.parse(source)) or "").split())
    return {(m, name.rstrip(".,;)")) for m, name in _DOC_REQUEST.findall(doc)}


def _assert_every_task_ran(run: LocustRun, locustfile: str, expected: set[tuple[str, str]]) -> None:
    assert run.proc.returncode == 0, run.explain()
    missing = {k for k in expected if run.requests.get(k, 0) == 0}
    assert not missing, f"tasks that never ran: {sorted(missing)}; ran: {run.requests}"
    assert not run.failures, run.explain()
    assert _docstring_requests(locustfile) == expected, "the docstring names other tasks"


def _kept_working(run: LocustRun, users: int, name: str) -> None:
    """Every user was still running until the run stopped them, and ``name`` was still
    being requested in the second half of the run (users that stop after one pass fail
    both). The history has one row a second; the last one is taken after the stop."""
    rows = [r for r in run.history if r["Name"] == name]
    trace = [(r["Timestamp"], r["User Count"], r["Total Request Count"]) for r in rows]
    counts = [int(r["User Count"]) for r in rows[:-1]]
    assert users in counts, trace
    assert all(n == users for n in counts[counts.index(users) :]), trace  # none stopped
    first, last = int(rows[0]["Timestamp"]), int(rows[-1]["Timestamp"])
    half = last - (last - first) // 2
    before = max(int(r["Total Request Count"]) for r in rows if int(r["Timestamp"]) <= half)
    assert int(rows[-1]["Total Request Count"]) > before, trace


def _outcome_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("outcomes.*"))


@pytest.fixture(scope="module")
def naive_server(base_settings: Settings) -> Iterator[int]:
    port = free_port()
    env = child_env(base_settings.with_(workers=1))
    proc = _start(
        [sys.executable, "-m", "loadtests.naive_peer", "--port", str(port), "--workers", "1"],
        env,
        "/healthz",
        port,
    )
    yield port
    stop_children([proc])


@pytest.fixture(scope="module")
def gateway_port(base_settings: Settings) -> Iterator[int]:
    port = free_port()
    env = child_env(
        base_settings.with_(http_port=port, workers=1, rate_ip_per_s=1e6, rate_ip_burst=1_000_000)
    )
    proc = _start([sys.executable, "-m", "stack", "worker"], env, "/healthz", port)
    yield port
    stop_children([proc])


@pytest.mark.slow
async def test_locust_stampede_smoke_against_the_naive_peer(
    naive_server: int, db: asyncpg.Pool, tokens: TokenService, tmp_path: Path
) -> None:
    async with db.acquire() as conn:
        sale_id = await naive_peer.create_sale(conn, 3)
    tokens_path = tmp_path / "tokens.txt"
    mint.write_tokens(tokens_path, [tokens.issue(5000 + i, "user") for i in range(5)])
    run = await asyncio.to_thread(
        _locust,
        "locustfile_stampede.py",
        naive_server,
        tmp_path,
        {
            "LOCUST_TOKENS_FILE": str(tokens_path),
            "LOCUST_SALE_ID": str(sale_id),
            "LOCUST_SALE_START": str(time.time()),
            "LOCUST_PAY_SHARE": "0",
            "LOCUST_NEXT_SHOPPER_S": "0.2",
            "LOCUST_OUTCOMES": str(tmp_path / "outcomes"),
        },
    )
    assert run.proc.returncode == 0, run.explain()
    assert run.total > 0 and not run.failures, run.explain()
    outcomes = invariants.read_outcomes(_outcome_files(tmp_path))
    assert outcomes.offered > 5  # the five users came back as further shoppers
    assert len(outcomes.accepted) == 3
    assert set(outcomes.rejected) == {"SOLD_OUT"}
    assert await db.fetchval(naive_peer.SQL_COUNT_ORDERS, sale_id) == 3


async def _admin_sale(port: int, db: asyncpg.Pool, tokens: TokenService, quantity: int) -> int:
    """A product, a SKU and a sale through the admin API (needs the flash-sale routes)."""
    async with db.acquire() as conn:
        admin_id, merchant_id = (
            (await mint.insert_users(conn, 1, "admin"))[0],
            (await mint.insert_users(conn, 1, "merchant"))[0],
        )
        product_id = await conn.fetchval(bench.SQL_MERCHANT_PRODUCT, merchant_id)
        sku_id = await conn.fetchval(bench.SQL_SKU, product_id, 1000)
    now = datetime.now(UTC)
    status, data = await asyncio.to_thread(
        _request,
        "POST",
        f"http://127.0.0.1:{port}/api/v1/admin/flash-sales",
        tokens.issue(admin_id, "admin"),
        {
            "sku_id": sku_id,
            "flash_price": 100,
            "quantity": quantity,
            "per_user_limit": 1,
            "start_at": (now + timedelta(seconds=1)).isoformat(),
            "end_at": (now + timedelta(hours=1)).isoformat(),
            "payment_window_s": 900,
        },
    )
    assert status == 201, data
    return int(data["data"]["flash_sale_id"])


async def _catalog(port: int, db: asyncpg.Pool, tokens: TokenService) -> None:
    """A few in-stock products through the merchant API, named after the search terms."""
    async with db.acquire() as conn:
        merchant_id = (await mint.insert_users(conn, 1, "merchant"))[0]
    token = tokens.issue(merchant_id, "merchant")
    for name in ("load phone", "load shoe", "load coffee"):
        status, data = await asyncio.to_thread(
            _request,
            "POST",
            f"http://127.0.0.1:{port}/api/v1/products",
            token,
            {"name": name, "price": 1999, "stock": 100_000},
        )
        assert status == 201, data


async def _minted(settings: Settings, tmp_path: Path, count: int) -> Path:
    """Users and tokens the way an operator makes them (``python -m loadtests.mint``)."""
    path = tmp_path / "tokens.txt"
    await mint.mint(settings, count, path)
    return path


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.usefixtures("consumer")
async def test_locust_stampede_runs_every_task_for_the_whole_run(
    gateway_port: int,
    base_settings: Settings,
    db: asyncpg.Pool,
    tokens: TokenService,
    tmp_path: Path,
) -> None:
    """Two Locust processes, four users for eight seconds against a sale of three units:
    every task of the docstring ran, nothing failed (409 SOLD_OUT / LIMIT_EXCEEDED are
    answers), the users kept coming back as new shoppers to the end, each process wrote
    its own outcome file, and the invariants hold."""
    sale_id = await _admin_sale(gateway_port, db, tokens, quantity=3)
    users = 4
    run = await asyncio.to_thread(
        _locust,
        "locustfile_stampede.py",
        gateway_port,
        tmp_path,
        {
            "LOCUST_TOKENS_FILE": str(await _minted(base_settings, tmp_path, 12)),
            "LOCUST_SALE_ID": str(sale_id),
            "LOCUST_PAY_SHARE": "1",
            "LOCUST_POLLS": "40",
            "LOCUST_NEXT_SHOPPER_S": "0.25",
            "LOCUST_OUTCOMES": str(tmp_path / "outcomes"),
        },
        users,
        8,
        2,
    )
    _assert_every_task_ran(run, "locustfile_stampede.py", STAMPEDE_REQUESTS)
    _kept_working(run, users, "/api/v1/flash-sales/[id]/join")
    files = _outcome_files(tmp_path)
    assert len(files) == 2, files  # one per Locust process
    outcomes = invariants.read_outcomes(files)
    assert outcomes.offered > users and len(outcomes.accepted) == 3
    assert set(outcomes.rejected) <= {"SOLD_OUT", "LIMIT_EXCEEDED"}, outcomes.rejected
    report = await invariants.report(base_settings.database, sale_id, outcomes, wait_s=10)
    assert report.ok and report.orders_other == 0, report.lines()


@pytest.mark.slow
@pytest.mark.integration
async def test_locust_storefront_runs_every_task(
    gateway_port: int,
    base_settings: Settings,
    db: asyncpg.Pool,
    tokens: TokenService,
    tmp_path: Path,
) -> None:
    """Browse, search, detail, cart add and update, checkout and pay each ran, and every
    answer was a success or an expected 409."""
    await _catalog(gateway_port, db, tokens)
    run = await asyncio.to_thread(
        _locust,
        "locustfile_storefront.py",
        gateway_port,
        tmp_path,
        {
            "LOCUST_TOKENS_FILE": str(await _minted(base_settings, tmp_path, 8)),
            "LOCUST_THINK_S": "0.02,0.1",
        },
        4,
        8,
        host_from_stack=True,
    )
    _assert_every_task_ran(run, "locustfile_storefront.py", STOREFRONT_REQUESTS)
    assert f"using the running stack's gateway http://127.0.0.1:{gateway_port}" in run.proc.stderr


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.usefixtures("consumer")
async def test_locust_mixed_runs_every_task_of_both_scenarios(
    gateway_port: int,
    base_settings: Settings,
    db: asyncpg.Pool,
    tokens: TokenService,
    tmp_path: Path,
) -> None:
    await _catalog(gateway_port, db, tokens)
    sale_id = await _admin_sale(gateway_port, db, tokens, quantity=3)
    run = await asyncio.to_thread(
        _locust,
        "locustfile_mixed.py",
        gateway_port,
        tmp_path,
        {
            "LOCUST_TOKENS_FILE": str(await _minted(base_settings, tmp_path, 20)),
            "LOCUST_SALE_ID": str(sale_id),
            "LOCUST_PAY_SHARE": "1",
            "LOCUST_POLLS": "40",
            "LOCUST_NEXT_SHOPPER_S": "0.25",
            "LOCUST_THINK_S": "0.02,0.1",
            "LOCUST_OUTCOMES": str(tmp_path / "outcomes"),
        },
        6,
        8,
    )
    _assert_every_task_ran(run, "locustfile_mixed.py", STAMPEDE_REQUESTS | STOREFRONT_REQUESTS)
    outcomes = invariants.read_outcomes(_outcome_files(tmp_path))
    report = await invariants.report(base_settings.database, sale_id, outcomes, wait_s=10)
    assert report.ok and len(outcomes.accepted) == 3, report.lines()


def test_process_share_is_read_once_the_worker_knows_its_index() -> None:
    def env(index: int, processes: int | None) -> SimpleNamespace:
        return SimpleNamespace(
            runner=SimpleNamespace(worker_index=index),
            parsed_options=SimpleNamespace(processes=processes),
        )

    assert scenario_support.process_share(env(0, None)) == (0, 1)
    assert scenario_support.process_share(env(1, 2)) == (1, 2)
    assert scenario_support.process_share(env(3, 4)) == (3, 4)


def test_gevent_is_never_imported_into_pytest() -> None:
    assert "gevent" not in sys.modules
    assert "locust" not in sys.modules


@contextlib.contextmanager
def _listing(sales: list[dict[str, Any]]) -> Iterator[str]:
    """A gateway's ``GET /api/v1/flash-sales/active`` answering ``sales``; its base URL."""

    class Listing(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = orjson.dumps({"code": 0, "data": sales})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Listing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def _sale(sale_id: int, status: str, start: str, mode: str = "open") -> dict[str, Any]:
    return {"flash_sale_id": sale_id, "status": status, "start_time": start, "mode": mode}


@pytest.mark.parametrize(
    ("sales", "chosen", "said"),
    [
        (
            [_sale(7, "upcoming", "2026-01-02T10:00:00Z")],
            7,
            "(upcoming, starts 2026-01-02T10:00:00Z)",
        ),
        (
            [
                _sale(7, "active", "2026-01-01T10:00:00Z"),
                _sale(9, "active", "2026-01-01T11:00:00Z"),
                _sale(10, "upcoming", "2026-01-02T10:00:00Z"),
            ],
            9,
            "(running; the newest of 2)",
        ),
        (
            [
                _sale(3, "upcoming", "2026-01-03T10:00:00Z"),
                _sale(5, "upcoming", "2026-01-04T10:00:00Z"),
            ],
            5,
            "(upcoming, starts 2026-01-04T10:00:00Z; the newest of 2)",
        ),
        ([_sale(4, "sold_out", "2026-01-01T10:00:00Z")], 4, "every join will be answered SOLD_OUT"),
        (
            [
                _sale(6, "active", "2026-01-01T10:00:00Z", "queued"),
                _sale(8, "upcoming", "2026-01-09T10:00:00Z"),
            ],
            8,
            "(upcoming",
        ),
    ],
    ids=["one-upcoming", "running-wins", "newest-upcoming", "sold-out", "open-only"],
)
def test_the_stampede_picks_the_running_or_newest_upcoming_sale(
    sales: list[dict[str, Any]], chosen: int, said: str
) -> None:
    with _listing(sales) as host:
        sale_id, line = scenario_support.choose_sale(host)
    assert sale_id == chosen
    assert line.startswith(f"LOCUST_SALE_ID unset; using sale {chosen} ") and said in line, line


def test_no_sale_that_makes_sense_is_one_line() -> None:
    with _listing([_sale(6, "active", "2026-01-01T10:00:00Z", "queued")]) as host:
        with pytest.raises(scenario_support.NoSale) as none:
            scenario_support.choose_sale(host)
        assert str(none.value) == (
            f"{host} lists no running or upcoming open sale (1 in another mode): create one "
            "(docs/api.md) or set LOCUST_SALE_ID"
        )
        assert scenario_support.choose_sale(host, "queued")[0] == 6


@pytest.mark.timeout(120)
def test_locust_with_no_sale_stops_at_once_in_one_line(tmp_path: Path) -> None:
    """Not 400 repeats of "set LOCUST_SALE_ID" over the whole run, then exit 1 with 0
    requests: one line, at once."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("t1\nt2\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCUST_", "FLASHSALE_"))}
    env.update(LOCUST_TOKENS_FILE=str(tokens), FLASHSALE_DATA_DIR=str(tmp_path / "data"))
    with _listing([]) as host:
        done = subprocess.run(
            [
                LOCUST,
                "-f",
                str(REPO / "loadtests" / "locustfile_stampede.py"),
                "--headless",
                "-u",
                "5",
                "-r",
                "5",
                "-t",
                "60s",
                "-H",
                host,
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=100,
            check=False,
        )
    assert done.returncode == 1, done.stderr[-2000:]
    said = [line for line in done.stderr.splitlines() if "LOCUST_SALE_ID" in line]
    assert said == [
        f"locust: {host} lists no running or upcoming open sale: create one (docs/api.md) "
        "or set LOCUST_SALE_ID"
    ], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()  # no user ran


def _outcome_file(path: Path, sale_id: int | None, *lines: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    head = [f"sale\t{sale_id}"] if sale_id else []
    path.write_text("".join(f"{line}\n" for line in [*head, *lines]))
    return path


def test_invariants_finds_the_outcome_files_and_their_sale_by_default(tmp_path: Path) -> None:
    _outcome_file(tmp_path / "out" / "outcomes.11", 3, "accepted\t1", "rejected\tSOLD_OUT")
    _outcome_file(tmp_path / "out" / "outcomes.12", 3, "accepted\t2")
    old = _outcome_file(tmp_path / "out" / "outcomes.9", 1, "accepted\t9")
    pattern = str(tmp_path / "out" / "outcomes.*")
    with pytest.raises(invariants.Unusable, match=r"name sales \[1, 3\]: pass --sale-id"):
        invariants.choose_files([pattern], None)
    sale_id, files = invariants.choose_files([pattern], 3)
    assert sale_id == 3 and old not in files
    outcomes = invariants.read_outcomes(files)
    assert (outcomes.offered, outcomes.accepted) == (3, ["1", "2"])  # the sale line is no join
    old.unlink()
    assert invariants.choose_files([pattern], None)[0] == 3


def test_invariants_without_outcome_files_says_what_to_pass(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
    done = subprocess.run(
        [sys.executable, "-m", "loadtests.invariants"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO), "FLASHSALE_DATA_DIR": str(tmp_path / "data")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "invariants: no outcome file matches out/outcomes.*: run a scenario first (it writes "
        "out/outcomes.<pid> unless LOCUST_OUTCOMES says otherwise), or pass --accepted-file"
    ]


QUEUE_REQUESTS = {
    ("POST", "/api/v1/flash-sales/[id]/enter"),
    ("GET", "/api/v1/flash-sales/[id]/queue"),
    ("POST", "/api/v1/flash-sales/[id]/join/[admission]"),
}


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.usefixtures("consumer")
async def test_locust_queue_enters_polls_and_joins_through_the_admission(
    gateway_port: int,
    base_settings: Settings,
    db: asyncpg.Pool,
    tokens: TokenService,
    tmp_path: Path,
) -> None:
    """Six users for eight seconds on a queued sale of three units: every task ran, nothing
    failed, the joins came only through admissions, and the invariants hold."""
    sale_id = await _admin_sale(gateway_port, db, tokens, quantity=3)
    async with db.acquire() as conn:
        admin_id = (await mint.insert_users(conn, 1, "admin"))[0]
    status, data = await asyncio.to_thread(
        _request,
        "PATCH",
        f"http://127.0.0.1:{gateway_port}/api/v1/admin/flash-sales/{sale_id}",
        tokens.issue(admin_id, "admin"),
        {"mode": "queued", "queue": {"admit_per_s": 2, "overbook": 1.0, "join_window_s": 5}},
    )
    assert status == 200, data
    run = await asyncio.to_thread(
        _locust,
        "locustfile_queue.py",
        gateway_port,
        tmp_path,
        {
            "LOCUST_TOKENS_FILE": str(await _minted(base_settings, tmp_path, 30)),
            "LOCUST_SALE_ID": str(sale_id),
            "LOCUST_ABANDON_SHARE": "0",
            "LOCUST_POLL_MAX_S": "0.5",
            "LOCUST_NEXT_SHOPPER_S": "0.25",
            "LOCUST_OUTCOMES": str(tmp_path / "outcomes"),
        },
        6,
        8,
    )
    _assert_every_task_ran(run, "locustfile_queue.py", QUEUE_REQUESTS)
    outcomes = invariants.read_outcomes(_outcome_files(tmp_path))
    assert len(outcomes.accepted) == 3, outcomes
    report = await invariants.report(base_settings.database, sale_id, outcomes, wait_s=10)
    assert report.ok and report.orders_other == 0, report.lines()
    figures = await queue_report.for_sale(base_settings.database, base_settings.redis, sale_id)
    assert figures is not None and figures.ok and figures.joined == 3, figures
    assert figures.entered >= figures.admitted >= 3, figures
