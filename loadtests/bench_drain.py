"""Only the drain rows of the bench (6 and 6b, optionally 6c), each run several times.

    python -m loadtests.bench_drain [--full] [--runs 3] [--consumers 1 4] [--no-row6] [--wal]

The same isolated stack and the same scenario functions as ``flashsale bench``
(:func:`loadtests.bench.start_env`, :func:`~loadtests.bench.drain`,
:func:`~loadtests.bench.drain_consumers`); it prints every run and, per row, the median
and the spread of the rate, of the CPU per order of the consumers and of PostgreSQL, and
of the WAL per order — the figures a change to the persistence path is judged by, in a
few minutes instead of a whole bench.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys

import asyncpg

from loadtests import bench
from loadtests.price_drain import SQL_WAL_BY_RELATION

WAL_TOP = 25


def _summary(name: str, values: list[float], unit: str) -> str:
    mid = statistics.median(values)
    return f"{name} {mid:.1f}{unit} (runs {', '.join(f'{v:.1f}' for v in values)})"


async def _lsn(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        return int(await conn.fetchval("SELECT pg_current_wal_lsn()"))
    finally:
        await conn.close()


async def _wal_by_relation(dsn: str, start: int, orders: int) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        end = await conn.fetchval("SELECT pg_current_wal_lsn()")
        rows = await conn.fetch(SQL_WAL_BY_RELATION, start, end)
    finally:
        await conn.close()
    return ", ".join(
        f"{r['relation']} {r['record_type']} {float(r['bytes']) / orders:.0f}"
        for r in rows[:WAL_TOP]
    )


def main(full: bool, runs: int, consumers: list[int], row6: bool, wal_detail: bool) -> int:
    plan = bench.FULL if full else bench.QUICK
    with bench.running_env("flashsale-bench-drain-", plan) as (stack, env):
        pg = stack.get("postgres").proc.pid
        if row6:
            rates = []
            for _ in range(runs):
                bench._stop(env, "consume")  # each run starts its consumer afresh
                row = bench.drain(env, plan)
                print(f"  {row.scenario}: {row.rps}/s {row.note}", flush=True)
                rates.append(float(row.rps or 0.0))
            print("6 drain: " + _summary("orders/s", rates, ""), flush=True)
        bench._stop(env, "consume")
        for k in consumers:
            rate, consumer_us, pg_us, wal = [], [], [], []
            for _ in range(runs):
                start = asyncio.run(_lsn(env.settings.database)) if wal_detail else 0
                row = bench.drain_consumers(env, plan, k, pg)
                print(f"  {row.scenario}: {row.rps}/s {row.note}", flush=True)
                n = row.detail["events"]
                if wal_detail:
                    by = asyncio.run(_wal_by_relation(env.settings.database, start, n))
                    print(f"    WAL B/order (incl. the prefill's) by relation: {by}", flush=True)
                rate.append(float(row.rps or 0.0))
                consumer_us.append(row.detail["consumer_cpu_s"] * 1e6 / n)
                pg_us.append(row.detail["postgres_cpu_s"] * 1e6 / n)
                wal.append(row.detail["wal_bytes_per_order"])
            print(
                f"6{'b' if k == 1 else 'c'} ({k} consumer(s)): "
                + "; ".join(
                    (
                        _summary("orders/s", rate, ""),
                        _summary("consumer CPU", consumer_us, " µs/order"),
                        _summary("PostgreSQL CPU", pg_us, " µs/order"),
                        _summary("WAL", wal, " B/order"),
                    )
                ),
                flush=True,
            )
    return 0


def _cli() -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_drain")
    parser.add_argument("--full", action="store_true", help="the full bench's event counts")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--consumers", type=int, nargs="*", default=[1])
    parser.add_argument("--no-row6", dest="row6", action="store_false")
    parser.add_argument(
        "--wal", action="store_true", help="the WAL of each 6b/6c run by relation and kind"
    )
    args = parser.parse_args()
    return main(args.full, args.runs, args.consumers, args.row6, args.wal)


if __name__ == "__main__":
    sys.exit(_cli())
