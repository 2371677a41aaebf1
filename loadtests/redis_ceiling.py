"""The Redis ceiling: ``redis-benchmark`` running the real reservation script by EVALSHA.

:func:`run_script_benchmark` SCRIPT LOADs a Lua file, then runs
``redis-benchmark ... EVALSHA <sha> <numkeys> <keys...> <args...>`` unpipelined and
pipelined (``-P 16``). ``redis-benchmark -r N`` replaces ``__rand_int__`` in the
keys/args with random numbers, which is how each call gets a different user.

:func:`reserve_script_call` says what ``lua/reserve.lua`` is called with; it is the
one piece that depends on that script's KEYS/ARGV layout.
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from redis import Redis

from flashsale.stores import rediskeys
from flashsale.stores.redisbatch import run_id_of

RESERVE_SCRIPT = Path(__file__).resolve().parent.parent / "lua" / "reserve.lua"


class RedisBenchError(Exception):
    """redis-benchmark is missing or failed."""


@dataclass
class RedisBenchResult:
    label: str
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    pipeline: int
    errors: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reserve_script_call(
    sale_id: int, user_id: int | str, run_id: str = ""
) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of one ``lua/reserve.lua`` call for ``user_id`` joining ``sale_id``.

    ``user_id`` may be the string ``"__rand_int__"`` so that redis-benchmark gives each
    call a different user (and order id). The layout mirrors
    ``flashsale.flash.join.join``; the per-IP bucket is made wide so that one
    loopback client measures the script, not the limiter. ``run_id`` is the server's
    (``INFO server``), as the gateway's connection passes it: the script's fence.
    """
    uid = str(user_id)
    keys = rediskeys.reserve_keys(sale_id, uid, "127.0.0.1")
    args = [uid, "1", "9" + uid, "", "bench", "5", "10", "1000000000", "1000000000", run_id]
    return keys, args


def server_run_id(redis_url: str) -> str:
    client = Redis.from_url(redis_url)
    try:
        return run_id_of(client.info("server"))
    finally:
        client.close()


def drop_sale(redis_url: str, sale_id: int) -> None:
    """Remove every key of a benchmark-only sale (and it from the sales index)."""
    client = Redis.from_url(redis_url)
    try:
        client.delete(*rediskeys.all_sale_keys(sale_id))
        client.srem(rediskeys.SALES_INDEX, sale_id)
    finally:
        client.close()


def script_load(redis_url: str, script: Path) -> str:
    client = Redis.from_url(redis_url)
    try:
        return str(client.script_load(script.read_text(encoding="utf-8")))
    finally:
        client.close()


def run_script_benchmark(
    port: int,
    sha: str,
    keys: list[str],
    args: list[str],
    *,
    requests: int = 100_000,
    clients: int = 50,
    pipeline: int = 1,
    keyspace: int = 1_000_000,
    label: str = "",
    timeout_s: float | None = None,
    password: str | None = None,
) -> RedisBenchResult:
    """One redis-benchmark run of ``EVALSHA sha len(keys) *keys *args`` on 127.0.0.1.

    By default it may take as long as ``requests`` at 2,000 calls per second (two minutes
    at least): the count is fixed, and a loaded machine has run a cluster primary's
    million calls past a fixed two minutes where a quiet one takes ninety seconds.
    """
    binary = shutil.which("redis-benchmark")
    if binary is None:
        raise RedisBenchError("redis-benchmark is not installed (Debian package redis-tools)")
    cmd = [
        binary,
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-n",
        str(requests),
        "-c",
        str(clients),
        "-P",
        str(pipeline),
        "-r",
        str(keyspace),
        *(["-a", password] if password else []),
        "--csv",
        "EVALSHA",
        sha,
        str(len(keys)),
        *keys,
        *args,
    ]
    if timeout_s is None:
        timeout_s = max(120.0, requests / 2_000)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        raise RedisBenchError(f"redis-benchmark failed: {proc.stderr.strip()[-500:]}")
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    if not rows:
        raise RedisBenchError(f"redis-benchmark printed no result: {proc.stdout[-500:]}")
    row = rows[-1]
    return RedisBenchResult(
        label=label or f"EVALSHA -P {pipeline}",
        rps=float(row["rps"]),
        p50_ms=float(row["p50_latency_ms"]),
        p99_ms=float(row["p99_latency_ms"]),
        requests=requests,
        pipeline=pipeline,
    )


def run_script(
    redis_url: str,
    port: int,
    script: Path,
    keys: list[str],
    args: list[str],
    *,
    requests: int = 100_000,
    clients: int = 50,
    pipelines: tuple[int, ...] = (1, 16),
) -> list[RedisBenchResult]:
    """SCRIPT LOAD ``script`` and benchmark it once per pipeline depth."""
    sha = script_load(redis_url, script)
    password = urlsplit(redis_url).password  # the embedded valkey runs with --requirepass
    return [
        run_script_benchmark(
            port,
            sha,
            keys,
            args,
            requests=requests,
            clients=clients,
            pipeline=p,
            label=f"{script.name} EVALSHA -P {p}",
            password=unquote(password) if password else None,
        )
        for p in pipelines
    ]
