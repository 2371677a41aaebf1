"""A small bounded stampede on one sale: each token joins once, all at the same time.

    python -m loadtests.burst --base http://127.0.0.1:8080 --sale 3 --tokens tokens.txt \
        [--count 200] [--concurrency 64] [--timeout-s 60]

Prints one JSON line: answers by status and error code, and the wall-clock time
(epoch seconds) at which the last accepted (202) answer arrived — what the browser
test compares with the moment the sale page says "sold out". Bounded in count (one
join per token, at most ``--count``) and in time (``--timeout-s``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp


async def burst(
    base: str, sale_id: int, tokens: list[str], concurrency: int, timeout_s: float
) -> dict[str, Any]:
    outcomes: Counter[str] = Counter()
    last_accepted = 0.0
    gate = asyncio.Semaphore(concurrency)
    url = f"{base}/api/v1/flash-sales/{sale_id}/join"

    async def one(session: aiohttp.ClientSession, token: str) -> None:
        nonlocal last_accepted
        headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": uuid.uuid4().hex}
        async with gate:
            try:
                async with session.post(url, json={"quantity": 1}, headers=headers) as resp:
                    body = await resp.json(content_type=None)
                    if resp.status == 202:
                        last_accepted = max(last_accepted, time.time())
                        outcomes["202"] += 1
                    else:
                        outcomes[f"{resp.status} {body.get('error', '?')}"] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcomes[type(exc).__name__] += 1

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.wait_for(asyncio.gather(*(one(session, t) for t in tokens)), timeout_s + 5)
    return {"outcomes": dict(outcomes), "last_accepted_at": last_accepted or None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--base", required=True)
    p.add_argument("--sale", type=int, required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--timeout-s", type=float, default=60.0)
    args = p.parse_args(argv)
    tokens = Path(args.tokens).read_text().split()[: args.count]
    result = asyncio.run(burst(args.base, args.sale, tokens, args.concurrency, args.timeout_s))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
