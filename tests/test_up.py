"""`flashsale up` as a user runs it: reaches ready, and SIGTERM leaves no process behind."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis as SyncRedis

from flashsale.stores import rediskeys
from stack.embedded import free_port
from stack.processes import StopFlag, Stopped

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _ready(port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise AssertionError("flashsale up exited early:\n" + out[-3000:])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                body: dict[str, object] = json.loads(resp.read())
                return body
        except OSError:
            time.sleep(0.2)
    raise AssertionError("not ready in time")


def _run_up(data_dir: str, port: int, *extra: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
    env.update(
        {
            "FLASHSALE_DATA_DIR": data_dir,
            "FLASHSALE_HTTP_PORT": str(port),
            "FLASHSALE_WORKERS": "2",
            "FLASHSALE_ACCESS_LOG": "false",
        }
    )
    return subprocess.Popen(
        [sys.executable, "-m", "stack", "up", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


@pytest.mark.timeout(300)
def test_up_ready_then_sigterm_leaves_nothing() -> None:
    with tempfile.TemporaryDirectory(prefix="flashsale-up-") as data_dir:
        port = free_port()
        proc = _run_up(data_dir, port)
        try:
            body = _ready(port, proc, 90)
            assert body["data"] == {
                "checks": {"redis": "up", "postgres": "up", "kafka": "up"},
                "down": [],
                "payment_provider": "sandbox",  # the demo turns the sandbox on
            }
            tree = _descendants(proc.pid)
            assert len(tree) >= 5  # servers, workers, consumer
            # a side command finds the running stack with no variable set
            env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
            side = subprocess.run(
                [sys.executable, "-m", "stack", "reconcile"],
                env={**env, "FLASHSALE_DATA_DIR": data_dir},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert side.returncode == 0, side.stdout + side.stderr
            assert "using the running stack's servers" in side.stderr
            assert "sale(s) checked, 0 with drift" in side.stdout
            tokens = Path(data_dir) / "tokens.txt"
            minted = subprocess.run(
                [sys.executable, "-m", "loadtests.mint", "--count", "3", "--out", str(tokens)],
                env={**env, "FLASHSALE_DATA_DIR": data_dir},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert minted.returncode == 0, minted.stdout + minted.stderr
            assert len(tokens.read_text().split()) == 3
            first = json.loads((Path(data_dir) / "stack.json").read_text())
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
            assert b"flashsale is up" in out
            assert f"http://127.0.0.1:{port}/dashboard".encode() in out  # the banner's pages
            assert re.search(rb"sale page +http://\S+/sale/\d+", out)
            logged = [line for line in out.splitlines() if line.startswith(b"{")]
            assert logged, "no log line"
            for line in logged:  # every process logs JSON lines
                assert {"ts", "level", "pid", "logger", "msg"} <= set(json.loads(line))
            assert not re.search(rb"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ", out, re.M)
            deadline = time.monotonic() + 5
            while any(_alive(p) for p in tree) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not [p for p in tree if _alive(p)], "processes left behind"
            # a second `up` reuses the data folder (demo data is not loaded twice)
            proc = _run_up(data_dir, port)
            _ready(port, proc, 90)
            again = json.loads((Path(data_dir) / "stack.json").read_text())
            assert again["ports"] == first["ports"]  # URLs from the last banner stay good
            # its Redis is a new run: the demo sale was re-armed under it before the gateway
            # said it was ready (not SALE_RECOVERING for the recovery sweeper's grace)
            redis = SyncRedis.from_url(again["redis_url"])
            try:
                run_id = redis.info("server")["run_id"]
                assert redis.hget(rediskeys.sale(1), "armed") == run_id.encode()
            finally:
                redis.close()
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_second_up_on_the_same_data_folder_is_refused_at_once_naming_the_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two supervisors would start two PostgreSQL servers on one data directory. A running
    first one is said at once (no wait: it is not about to go), with its pid."""
    from stack.up import DataDirBusy, _lock_data_dir

    held = _lock_data_dir(tmp_path)
    try:
        with pytest.raises(DataDirBusy) as busy:
            _lock_data_dir(tmp_path, wait_s=3600)  # a wait would hang the test
        assert f"another `flashsale up` (pid {os.getpid()}, running) is using" in str(busy.value)
        assert "waiting" not in capsys.readouterr().err
        held.stopping()  # one that is stopping is waited for, and said so
        with pytest.raises(DataDirBusy, match=f"pid {os.getpid()}, still stopping"):
            _lock_data_dir(tmp_path, wait_s=0.3)
        assert "to finish stopping" in capsys.readouterr().err
    finally:
        held.close()
    _lock_data_dir(tmp_path, wait_s=0.3).close()  # free again once the first one is gone


@pytest.mark.timeout(300)
def test_sigterm_while_starting_stops_at_once(tmp_path: Path) -> None:
    """Not held until the start finishes: no banner, nothing left, the folder free again."""
    data_dir = tmp_path / "data"
    proc = _run_up(str(data_dir), free_port())
    try:
        deadline = time.monotonic() + 120
        # PostgreSQL's folder appears as its initdb begins: the broker, the migrations, the
        # demo data and the workers are all still to come (waiting for the broker's folder
        # left too little of the start on a quick machine: it finished before the signal)
        while not (data_dir / "postgres").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "up did not start"
            time.sleep(0.05)
        tree = _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert "flashsale is up" not in text
    assert "flashsale: SIGTERM while starting: stopping what had started" in text.splitlines()
    assert not (data_dir / "stack.json").exists()
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in tree if _alive(p)], "processes left behind"


async def _stampede_on(data_dir: str, base: str) -> tuple[int, int]:
    """Create a 50-unit sale through the admin API and send 200 shoppers at it."""
    from datetime import UTC, datetime, timedelta

    import aiohttp
    import asyncpg

    from flashsale.auth import TokenService
    from loadtests import mint

    stack = json.loads((Path(data_dir) / "stack.json").read_text())
    tokens = TokenService((Path(data_dir) / "secret_key").read_text().strip(), 3600)
    conn = await asyncpg.connect(stack["database_url"])
    try:
        shoppers = await mint.insert_users(conn, 200)
        (admin,) = await mint.insert_users(conn, 1, "admin")
        (merchant,) = await mint.insert_users(conn, 1, "merchant")
        product = await conn.fetchval(
            "INSERT INTO products (merchant_id, name) VALUES ($1, 'up test') RETURNING id",
            merchant,
        )
        sku = await conn.fetchval(
            "INSERT INTO skus (product_id, price_cents, on_hand) VALUES ($1, 1000, 50) "
            "RETURNING id",
            product,
        )
    finally:
        await conn.close()
    start = datetime.now(UTC) - timedelta(seconds=1)
    async with aiohttp.ClientSession() as http:
        async with http.post(
            base + "/api/v1/admin/flash-sales",
            headers={"Authorization": f"Bearer {tokens.issue(admin, 'admin')}"},
            json={
                "sku_id": sku,
                "flash_price": 500,
                "quantity": 50,
                "per_user_limit": 1,
                "start_at": start.isoformat(),
                "end_at": (start + timedelta(hours=1)).isoformat(),
                "payment_window_s": 900,
            },
        ) as resp:
            assert resp.status == 201, await resp.text()
            sale_id = (await resp.json())["data"]["flash_sale_id"]

        async def one(uid: int) -> int:
            async with http.post(
                f"{base}/api/v1/flash-sales/{sale_id}/join",
                headers={"Authorization": f"Bearer {tokens.issue(uid, 'user')}"},
                json={"quantity": 1},
            ) as resp:
                return resp.status

        statuses = await asyncio.gather(*(one(u) for u in shoppers))
    return statuses.count(202), statuses.count(409)


@pytest.mark.timeout(300)
def test_up_with_redis_shards_runs_a_stampede() -> None:
    """``up --redis-shards 3`` starts a valkey cluster (3 primaries, 3 replicas) and the
    stack sells a sale on it exactly; reconcile, a side command, finds no drift."""
    with tempfile.TemporaryDirectory(prefix="flashsale-up-") as data_dir:
        port = free_port()
        proc = _run_up(data_dir, port, "--no-demo", "--redis-shards", "3")
        try:
            body = _ready(port, proc, 120)
            assert body["data"]["down"] == []  # type: ignore[index]
            stack_file = Path(data_dir) / "stack.json"
            deadline = time.monotonic() + 30
            while not stack_file.exists():  # written once up itself has seen the gateway ready
                assert time.monotonic() < deadline, "no stack.json"
                time.sleep(0.1)
            stack = json.loads(stack_file.read_text())
            assert stack["redis_cluster"] is True
            assert len(stack["redis_url"].split(",")) == 6
            accepted, refused = asyncio.run(_stampede_on(data_dir, f"http://127.0.0.1:{port}"))
            assert (accepted, refused) == (50, 150)
            env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
            deadline = time.monotonic() + 60
            while True:  # once the consumer has persisted the 50 orders
                side = subprocess.run(
                    [sys.executable, "-m", "stack", "reconcile"],
                    env={**env, "FLASHSALE_DATA_DIR": data_dir},
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                if side.returncode == 0 or time.monotonic() > deadline:
                    break
                time.sleep(1)
            assert side.returncode == 0, side.stdout + side.stderr
            assert "0 with drift" in side.stdout
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
            assert b"(cluster of 6 nodes)" in out
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def restore_signals() -> Iterator[None]:
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.mark.usefixtures("restore_signals")
# the finalizer's Stopped is printed and dropped by Python: that is the case under test
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_stop_signal_is_not_lost_on_the_way_through_the_start() -> None:
    """The start's own ``except Exception`` does not swallow it, and one raised where Python
    can only print it (a finalizer) still stops the start at ``settle``."""
    flag = StopFlag(interrupt=True)
    with pytest.raises(Stopped):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs here
        except Exception:
            pass
    flag = StopFlag(interrupt=True)

    class Finalized:
        def __del__(self) -> None:
            flag._handle(signal.SIGTERM, None)  # raises Stopped: Python prints and goes on

    Finalized()
    assert flag
    with pytest.raises(Stopped):
        flag.settle()
