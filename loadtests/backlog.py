"""Behind a backlog, does the stranded sweeper publish again what waits in the topic?

    python -m loadtests.backlog [--seconds 20] [--pause 15]

Starts the bench's stack (valkey, PostgreSQL, tansu, two gateway workers), creates a sale
and starts one consumer with its sweepers, as ``flashsale consume`` runs. wrk (or the Python
client) joins the sale for ``--seconds``; two seconds in, the consumer is stopped (SIGSTOP)
for ``--pause`` seconds, so that the accepted joins wait in the topic, then continued. From
then on, every 0.5 s for up to 20 s, it prints the sale's reservation log (entries, and
those older than ``FLASHSALE_STRANDED_AFTER_S``) and how many of them the sweepers have
published again (the republish counts' hash). Last, once every accepted order is in
PostgreSQL: the orders written against the joins answered 202 (the joins still in flight
when the load stopped are written too, unanswered) (BENCHMARKS.md, "A backlog is not
published twice").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
import time

import redis as redis_sync

from flashsale.stores import rediskeys
from loadtests import bench, loadgen

SAMPLE_EVERY_S = 0.5
SAMPLES = 40
PAUSE_AFTER_S = 2.0
DRAIN_TIMEOUT_S = 300.0


def _watch(env: bench.Env, sale_id: int, consumer: int, pause_s: float) -> None:
    """Stop the consumer, continue it, then sample the sale's log and republish counts."""
    time.sleep(PAUSE_AFTER_S)
    os.kill(consumer, signal.SIGSTOP)
    time.sleep(pause_s)
    client = redis_sync.Redis.from_url(env.settings.redis)
    after_ms = env.settings.stranded_after_s * 1000
    times, tries = rediskeys.log_times(sale_id), rediskeys.republished(sale_id)
    try:

        def older() -> int:
            return int(client.zcount(times, "-inf", int(time.time() * 1000) - after_ms))

        print(f"at resume: log {client.zcard(times)}, older than {after_ms} ms {older()}")
        os.kill(consumer, signal.SIGCONT)
        for i in range(1, SAMPLES + 1):
            time.sleep(SAMPLE_EVERY_S)
            print(
                f"  +{i * SAMPLE_EVERY_S:4.1f} s: log {client.zcard(times)}, older {older()}, "
                f"published again {client.hlen(tries)}",
                flush=True,
            )
    finally:
        client.close()


def main(seconds: float, pause_s: float) -> int:
    plan = bench.QUICK
    with bench.running_env("flashsale-backlog-", plan) as (_, env):
        sale_id, start = bench.create_sale(env, 100_000_000, 1_000_000)
        bench._wait_until(start)
        consumer = bench.start_consumer(env)
        watcher = threading.Thread(
            target=_watch, args=(env, sale_id, consumer.pid, pause_s), daemon=True
        )
        watcher.start()
        run = loadgen.run(
            bench._join_path(sale_id),
            env.settings.http_port,
            duration_s=seconds,
            max_requests=plan.max_requests,
            tokens_file=env.tokens_file,
            method="POST",
            body=bench.JOIN_BODY,
            expected=(202,),
            connections=bench.CONNECTIONS,
            processes=bench.THREADS,
        )
        accepted = run.statuses.get("202", 0)
        print(f"joins: {run.rps:,.0f}/s, {accepted:,} accepted, {run.errors} errors", flush=True)
        watcher.join()
        _, _, written = asyncio.run(
            bench._count_orders(
                env.settings.database,
                sale_id,
                accepted,
                DRAIN_TIMEOUT_S,
                lambda: consumer.poll() is None,
            )
        )
        # wrk stops counting with joins still in flight: those may be written too
        print(f"orders in PostgreSQL: {written:,}; joins answered 202: {accepted:,}", flush=True)
        return 0 if written >= accepted else 1


def _cli() -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.backlog")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long the joins run")
    parser.add_argument(
        "--pause", type=float, default=15.0, help="how long the consumer is stopped"
    )
    args = parser.parse_args()
    return main(args.seconds, args.pause)


if __name__ == "__main__":
    sys.exit(_cli())
