"""Redis CPU per reservation by batch depth: what group commit could save.

The join path sends each event-loop tick's reservations as one pipelined write
(:mod:`flashsale.stores.redisbatch`), and with ``appendfsync always`` valkey fsyncs once
per batch it reads. This runs ``lua/reserve.lua`` from one connection in batches of each
depth, against a valkey of its own started as the stack starts it (AOF, fsync always),
and prints the server's CPU (user + system, ``/proc``) per call: the script's own cost
(``usec_per_call`` of ``INFO commandstats``) plus the batch's I/O and fsync shared by its
calls. Each call is a different user, as in a stampede; rounds alternate the depths.

    python -m loadtests.redis_batch_cost [--depth 1 4 16 64] [--calls 30000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from redis import Redis

from loadtests.bench import _cpu_s
from loadtests.redis_ceiling import RESERVE_SCRIPT, reserve_script_call
from stack import start_redis


def one_run(depth: int, calls: int) -> tuple[float, float]:
    """(server CPU µs per call, the script's own µs per call) at one batch depth."""
    root = Path(tempfile.mkdtemp(prefix="flashsale-batchcost-"))
    server = start_redis(root / "redis", appendfsync="always")
    try:
        client = Redis.from_url(server.url)
        sha = client.script_load(RESERVE_SCRIPT.read_text(encoding="utf-8"))
        run_id = str(client.info("server")["run_id"])
        now = int(time.time() * 1000)
        keys, _ = reserve_script_call(1, 0, run_id)
        client.hset(
            keys[0],
            mapping={
                "remaining": 10**9,
                "limit": 10**6,
                "start_ms": now - 1000,
                "end_ms": now + 3_600_000,
                "closed": 0,
                "window_ms": 900_000,
                "sku": 1,
                "product": 1,
                "price": 4900,
                "armed": run_id,
            },
        )
        client.config_resetstat()
        pid = server.proc.pid
        before = _cpu_s(pid)
        for start in range(0, calls, depth):
            pipe = client.pipeline(transaction=False)
            for user in range(start, min(start + depth, calls)):
                k, a = reserve_script_call(1, user + 1, run_id)
                pipe.evalsha(sha, len(k), *k, *a)
            replies = pipe.execute()
            if replies[-1][0] != 0:  # RESERVED
                raise RuntimeError(f"reserve answered {replies[-1]!r}")
        used = _cpu_s(pid) - before
        script = float(client.info("commandstats")["cmdstat_evalsha"]["usec_per_call"])
        client.close()
        return used * 1e6 / calls, script
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--calls", type=int, default=30_000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    seen: dict[int, list[tuple[float, float]]] = {d: [] for d in args.depth}
    for _ in range(args.rounds):
        for depth in args.depth:
            seen[depth].append(one_run(depth, args.calls))
    print("| calls per batch | Redis CPU µs per call (median, min–max) | the script's own µs |")
    print("|---:|---:|---:|")
    for depth, runs in seen.items():
        cpu = [c for c, _ in runs]
        script = statistics.median(s for _, s in runs)
        print(
            f"| {depth} | {statistics.median(cpu):.1f} ({min(cpu):.1f}–{max(cpu):.1f})"
            f" | {script:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
