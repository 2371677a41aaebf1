"""Dashboards left open: N event streams of one sale, read for a bounded time.

    python -m loadtests.watch --base http://127.0.0.1:8080 --sale 3 --token <admin token> \
        [--count 3] [--seconds 30]

What ``flashsale bench`` runs beside the join load to show that watching a sale does not
slow the join path. Prints one JSON line when done: snapshots received per stream.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys

import aiohttp


async def _stream(base: str, sale_id: int, token: str, seconds: float) -> int:
    url = f"{base}/api/v1/dashboard/sales/{sale_id}/events"
    snapshots = 0
    timeout = aiohttp.ClientTimeout(total=None, sock_read=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def read() -> None:
            nonlocal snapshots
            async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
                resp.raise_for_status()
                async for line in resp.content:
                    if line.startswith(b"event: snapshot"):
                        snapshots += 1

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(read(), seconds)
    return snapshots


async def watch(base: str, sale_id: int, token: str, count: int, seconds: float) -> list[int]:
    return list(
        await asyncio.gather(*(_stream(base, sale_id, token, seconds) for _ in range(count)))
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--base", required=True)
    p.add_argument("--sale", type=int, required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--seconds", type=float, default=30.0)
    args = p.parse_args(argv)
    got = asyncio.run(watch(args.base, args.sale, args.token, args.count, args.seconds))
    print(json.dumps({"snapshots": got}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
