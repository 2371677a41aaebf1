"""Dashboards left open: N event streams of one sale, read for a bounded time.

    python -m loadtests.watch --base http://127.0.0.1:8080 --sale 3 --token <admin token> \
        [--count 3] [--seconds 30]
    python -m loadtests.watch --base http://127.0.0.1:8080 --sale 3 --pages 500 [--seconds 30]

What ``flashsale bench`` runs beside the join load to show that watching a sale does not
slow the join path. Prints one JSON line when done: snapshots received per stream. With
``--pages N``: N sale pages' anonymous streams instead, spread over loopback source
addresses (127.0.1.x, ``--per-address`` each, within the gateway's per-address cap);
prints how many opened, how many were refused and the events they received.
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


async def _pages_from(
    base: str, sale_id: int, source: str, count: int, seconds: float
) -> tuple[int, int, int]:
    """``count`` sale-page streams from one source address: (opened, refused, events)."""
    url = f"{base}/api/v1/flash-sales/{sale_id}/events"
    opened = refused = events = 0
    connector = aiohttp.TCPConnector(local_addr=(source, 0), limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def read() -> None:
            nonlocal opened, refused, events
            async with session.get(url) as resp:
                if resp.status != 200:
                    refused += 1
                    return
                opened += 1
                async for line in resp.content:
                    events += line.startswith(b"event: ")

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(read() for _ in range(count))), seconds)
    return opened, refused, events


async def pages(
    base: str, sale_id: int, count: int, per_address: int, seconds: float
) -> dict[str, int]:
    sources = [f"127.0.1.{1 + i}" for i in range((count + per_address - 1) // per_address)]
    got = await asyncio.gather(
        *(
            _pages_from(base, sale_id, src, min(per_address, count - i * per_address), seconds)
            for i, src in enumerate(sources)
        )
    )
    return {
        "opened": sum(g[0] for g in got),
        "refused": sum(g[1] for g in got),
        "events": sum(g[2] for g in got),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--base", required=True)
    p.add_argument("--sale", type=int, required=True)
    p.add_argument("--token", default="")
    p.add_argument("--pages", type=int, default=0, help="sale-page streams instead")
    p.add_argument("--per-address", type=int, default=20)
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--seconds", type=float, default=30.0)
    args = p.parse_args(argv)
    if args.pages:
        opened = asyncio.run(
            pages(args.base, args.sale, args.pages, args.per_address, args.seconds)
        )
        print(json.dumps(opened), flush=True)
        return 0
    got = asyncio.run(watch(args.base, args.sale, args.token, args.count, args.seconds))
    print(json.dumps({"snapshots": got}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
