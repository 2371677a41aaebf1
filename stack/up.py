"""``flashsale up``: the whole stack in one command.

Starts the embedded servers for whichever of the three URLs is unset, applies the
migrations, loads the demo data, starts the gateway workers and the consumers,
prints how to use it, and on Ctrl-C or SIGTERM stops everything it started, in
order: gateway first (no new orders), consumers next (they drain), servers last.

Crash-only: a worker, the consumer or an embedded server that dies is restarted (with a
backoff and a log line) and the rest keep running; ``up`` stops by itself only when one
of them crash-loops, and says so in one line.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

import asyncpg

from flashsale.settings import Settings
from stack import stackfile
from stack.embedded import EmbeddedError, EmbeddedStack, restart_server, start_stack
from stack.preflight import PreflightFailed, check_reachable, claim_port
from stack.processes import (
    CrashLoop,
    StopFlag,
    Stopped,
    Supervised,
    child_env,
    ensure_multiproc_dir,
    keep_alive,
    processes,
    run_loop,
    spawn,
    stop_children,
)

log = logging.getLogger(__name__)


def _secret(root: Path, name: str = "secret_key") -> str:
    path = root / name
    if path.exists():
        return path.read_text().strip()
    root.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    path.write_text(value)
    path.chmod(0o600)
    return value


async def prepare(settings: Settings, *, demo: bool, rearm: bool = False) -> dict[str, object]:
    """Migrations, topics, (optionally) the demo data, and with ``rearm`` the sales fenced
    by a Redis this ``up`` has just started re-armed before any gateway takes a join."""
    from flashsale.demo import load_demo
    from flashsale.stores.db import create_pool, migrate
    from flashsale.stores.kafka import ensure_topics

    pool = await create_pool(settings.database, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            applied = await migrate(conn)
        if applied:
            log.info("migrations applied: %s", ", ".join(applied))
        await ensure_topics(settings)
        demo_info = await load_demo(settings, pool) if demo else {}
        if rearm:
            await _rearm(settings, pool)
        return demo_info
    finally:
        await pool.close()


async def _rearm(settings: Settings, pool: asyncpg.Pool) -> None:
    """Recount every sale a Redis restart fenced, now rather than by the recovery sweeper a
    few seconds after the gateway says it is ready (joins would answer SALE_RECOVERING
    meanwhile). No grace is needed: the Redis is this ``up``'s own, so no gateway of
    another stack can be publishing to it, and those of the last run are gone."""
    from consumers.recovery import Recovery
    from flashsale.stores.metrics import get_metrics
    from flashsale.stores.redisclient import open_redis

    redis = open_redis(settings)
    try:
        started = time.monotonic()
        armed = await Recovery(settings, pool, redis, get_metrics()).run_once(force=True)
    finally:
        await redis.aclose()
    if armed:
        log.info(
            "re-armed %d sale(s) under the new Redis run in %.1fs, before the gateway starts",
            armed,
            time.monotonic() - started,
        )


def _wait_ready(
    url: str, timeout_s: float, children: list[Supervised], starting: list[Supervised]
) -> bool:
    """Until ``url`` answers 200; a process of ``starting`` that dies meanwhile is a start-up
    failure, reported at once (its own output, above, says why)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in starting:
            code = child.proc.poll() if child.proc is not None else None
            if code is not None:
                raise CrashLoop(f"{child.name} exited with {code} while starting (see above)")
        keep_alive(children)
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def _server_keeper(
    stack: EmbeddedStack, name: str, settings: Settings, clients: list[Supervised]
) -> Supervised:
    """An embedded server kept running on its port and folder.

    A restarted broker is memory-only: it comes back empty, and the sweepers republish
    what Redis still holds. While it starts, the clients are paused (SIGSTOP), so that
    none of them auto-creates the orders topic with the broker's default partition count
    before ``ensure_topics`` creates it with ``FLASHSALE_KAFKA_PARTITIONS``.
    """

    def start() -> subprocess.Popen[bytes]:
        if name != "kafka":
            return restart_server(stack, name).proc
        paused = [p for p in processes(clients) if p.poll() is None]
        for p in paused:
            p.send_signal(signal.SIGSTOP)
        try:
            server = restart_server(stack, name)

            async def topics() -> None:
                from flashsale.stores.kafka import ensure_topics

                await ensure_topics(settings)

            run_loop(topics)
        finally:
            for p in paused:
                p.send_signal(signal.SIGCONT)
        return server.proc

    return Supervised(f"embedded {name}", start, proc=stack.get(name).proc)


class DataDirBusy(Exception):
    """Another `flashsale up` holds the data folder."""


STOPPING = "stopping"


class DataDirLock:
    """``root/up.lock``, held (flock) for as long as this process lives; it reads
    ``<pid>`` while the stack starts and runs, ``<pid> stopping`` once it stops."""

    def __init__(self, handle: IO[str]) -> None:
        self._handle = handle
        self._write(str(os.getpid()))

    def _write(self, text: str) -> None:
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(text)
        self._handle.flush()

    def stopping(self) -> None:
        self._write(f"{os.getpid()} {STOPPING}")

    def close(self) -> None:
        self._handle.close()


def _lock_data_dir(root: Path, wait_s: float = 30.0) -> DataDirLock:
    """Hold ``root/up.lock``: two supervisors on one data folder would start two PostgreSQL
    servers on one data directory.

    A running ``up`` is said at once, with its pid. Only one that is already stopping
    (PostgreSQL checkpoints on the way out) is waited for, up to ``wait_s``.
    """
    handle = (root / "up.lock").open("a+")
    deadline = time.monotonic() + wait_s
    said = False
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            pid, _, state = handle.read().strip().partition(" ")
            if state != STOPPING or time.monotonic() > deadline:
                handle.close()
                doing = "still stopping" if state == STOPPING else "running"
                raise DataDirBusy(
                    f"another `flashsale up` (pid {pid or '?'}, {doing}) is using "
                    f"{root.resolve()}; stop it first (Ctrl-C in its terminal, or kill "
                    f"{pid or 'it'}) or set FLASHSALE_DATA_DIR to another folder"
                ) from None
            if not said:
                print(
                    f"flashsale: waiting up to {wait_s:.0f}s for the `flashsale up` (pid {pid}) "
                    f"that holds {root.resolve()} to finish stopping…",
                    file=sys.stderr,
                    flush=True,
                )
                said = True
            time.sleep(0.2)
            continue
        return DataDirLock(handle)


def up(settings: Settings, *, demo: bool = True, redis_shards: int = 0) -> int:
    root = Path(settings.data_dir)
    root.mkdir(parents=True, exist_ok=True)
    try:
        lock = _lock_data_dir(root)
    except DataDirBusy as exc:
        print(f"flashsale: {exc}", file=sys.stderr)
        return 2
    try:
        port = claim_port(settings.http_host, settings.http_port)
        check_reachable(settings)
    except PreflightFailed as exc:
        lock.close()
        print(f"flashsale: {exc}", file=sys.stderr)
        return 2
    try:
        return _up(settings, root, lock, demo=demo, redis_shards=redis_shards)
    finally:
        port.close()
        lock.close()


def _up(
    settings: Settings, root: Path, lock: DataDirLock, *, demo: bool, redis_shards: int = 0
) -> int:
    started = time.monotonic()
    stack: EmbeddedStack | None = None
    children: list[Supervised] = []
    consumers: list[Supervised] = []
    # Ctrl-C or SIGTERM while starting stops at once (the start raises Stopped, and every
    # `finally` on the way out stops what had started); once up, the loop below polls it.
    flag = StopFlag(interrupt=True)
    try:
        need = {
            "redis": settings.redis_url is None,
            "postgres": settings.database_url is None,
            "kafka": settings.kafka_bootstrap is None,
        }
        if any(need.values()):
            stack = start_stack(
                root,
                redis=need["redis"],
                postgres=need["postgres"],
                kafka=need["kafka"],
                ports=stackfile.remembered_ports(settings),
                redis_shards=redis_shards if need["redis"] else 0,
            )
            if need["redis"] and redis_shards:
                settings = settings.with_(redis_cluster=True, redis_wait_replicas=1)
            settings = settings.with_(
                redis_url=settings.redis_url or stack.url("redis"),
                database_url=settings.database_url or stack.url("postgres"),
                kafka_bootstrap=settings.kafka_bootstrap or stack.url("kafka"),
            )
        servers_s = time.monotonic() - started
        if settings.secret_key is None:
            settings = settings.with_(secret_key=_secret(root))
        if demo:  # the demo pays through the sandbox; production never mounts it
            settings = settings.with_(payment_provider="sandbox")
        if settings.metrics_token is None:
            settings = settings.with_(metrics_token=_secret(root, "metrics_token"))
        demo_info: dict[str, object] = {}

        async def _prepare() -> None:
            demo_info.update(await prepare(settings, demo=demo, rearm=need["redis"]))

        run_loop(_prepare)
        ensure_multiproc_dir(str(root / "metrics"))
        env = child_env(settings)
        for i in range(settings.workers):
            children.append(
                Supervised(
                    f"gateway worker {i + 1}",
                    lambda: spawn([sys.executable, "-m", "stack", "worker"], env),
                )
            )
        # the gateway's /metrics already aggregates the consumer's samples (multiprocess dir)
        consumer_env = {**env, "FLASHSALE_METRICS_PORT": "0"}
        consumers.append(
            Supervised(
                "consumer",
                lambda: spawn([sys.executable, "-m", "stack", "consume"], consumer_env),
            )
        )
        servers = (
            [_server_keeper(stack, s.name, settings, children + consumers) for s in stack.servers]
            if stack is not None
            else []
        )
        everything = servers + children + consumers
        base = f"http://{settings.http_host}:{settings.http_port}"
        if not _wait_ready(base + "/readyz", 60, everything, children + consumers):
            log.error("gateway did not become ready at %s/readyz", base)
            return 1
        flag.settle()
        stackfile.write(settings, stack.ports() if stack else {})
        _banner(settings, base, demo_info, servers_s, time.monotonic() - started, stack)
        while not flag:
            keep_alive(everything)
            time.sleep(0.2)
    except (CrashLoop, EmbeddedError) as exc:
        print(f"flashsale: {exc}", file=sys.stderr, flush=True)
        return 1
    except Stopped as exc:
        print(f"flashsale: {exc} while starting: stopping what had started", file=sys.stderr)
        return 0
    else:
        print("\nstopping…", flush=True)
        return 0
    finally:
        lock.stopping()
        stop_children(processes(children))  # gateway first: no new orders
        stop_children(processes(consumers), timeout_s=30)
        if stack is not None:
            stack.stop()


# The stampede the README walks through, printed as is by the banner (a test holds them equal).
LOAD_WALK = (
    ".venv/bin/python -m loadtests.mint --count 2000 --out tokens.txt",
    ".venv/bin/locust -f loadtests/locustfile_stampede.py --headless -u 200 -r 200 -t 30s",
    ".venv/bin/python -m loadtests.invariants",
)


def _default_data_dir(settings: Settings) -> bool:
    """Whether the load tools find this stack with no variable set (run from the checkout)."""
    return Path(settings.data_dir).resolve() == (Path.cwd() / ".flashsale").resolve()


def _metrics_token_hint(settings: Settings) -> str:
    path = Path(settings.data_dir).resolve() / "metrics_token"
    generated = path.exists() and path.read_text().strip() == settings.metrics_token
    return f"$(cat {path})" if generated else "$FLASHSALE_METRICS_TOKEN"


def _sales(base: str) -> list[dict[str, Any]]:
    """The running and upcoming sales, as the gateway shows them (their status is now's)."""
    try:
        with urllib.request.urlopen(base + "/api/v1/flash-sales/active", timeout=5) as resp:  # noqa: S310
            data = json.loads(resp.read())["data"]
    except (OSError, ValueError, KeyError):
        return []
    return data if isinstance(data, list) else []


def _banner(
    settings: Settings,
    base: str,
    demo: dict[str, object],
    servers_s: float,
    total_s: float,
    stack: EmbeddedStack | None,
) -> None:
    lines = [
        "",
        "flashsale is up",
        f"  gateway        {base}   ({settings.workers} workers)",
        f"  ready check    curl {base}/readyz",
        f"  API spec       {base}/api/v1/openapi.json",
        f"  dashboard      {base}/dashboard   (log in as the demo admin or merchant)",
        f'  metrics        curl -H "Authorization: Bearer {_metrics_token_hint(settings)}"'
        f" {base}/metrics",
        f"  redis          {settings.redis_url}"
        + (f"  (cluster of {len(settings.redis_seeds)} nodes)" if settings.redis_cluster else ""),
        f"  postgres       {settings.database_url}",
        f"  kafka          {settings.kafka_bootstrap}",
        f"  payments       {settings.payment_provider} provider",
        f"  data folder    {os.path.abspath(settings.data_dir)}"
        + ("  (embedded servers)" if stack else ""),
        f"  started in     {total_s:.1f}s (servers {servers_s:.2f}s)",
    ]
    for role, cred in (demo.get("accounts") or {}).items():  # type: ignore[attr-defined]
        lines.append(f"  demo {role:<9} {cred}")
    for sale in _sales(base):
        lines.append(
            f"  flash sale     id {sale['flash_sale_id']}: {sale['status']}, "
            f"{sale['remaining_quantity']}/{sale['total_quantity']} left, "
            f"{sale['start_time']} → {sale['end_time']}"
        )
        lines.append(f"  sale page      {base}/sale/{sale['flash_sale_id']}")
    lines += [
        "",
        "  log in:   curl -s -XPOST "
        + base
        + "/api/v1/auth/login -H 'Content-Type: application/json'"
        ' -d \'{"login":"shopper1@demo.local","password":"shopper-pass-1"}\'',
        "  a stampede, from a second terminal once the sale is active (as in README.md):"
        + (
            ""
            if _default_data_dir(settings)
            else f"   (with FLASHSALE_DATA_DIR={settings.data_dir})"
        ),
        *(f"    {line}" for line in LOAD_WALK),
        "",
        "Ctrl-C stops everything.",
    ]
    # one write, so that no log line of a child lands inside the banner
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
