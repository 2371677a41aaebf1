"""CPU of one sold-out refusal through :class:`gateway.fastjoin.JoinProtocol`, in-process.

A sold-out refusal does no I/O but its answer's write, so its Python cost can be read
without sockets: the protocol is fed a shopper's request (six headers, a fresh-token
cache hit) on a transport that keeps what it is written, with the app's real token
service, plan switches, request figures and a sale state in a cache of its own. CPU time
(``time.process_time``) per refusal is printed for five rounds, each beside the time of
``sum(range(1000))`` in the same round and the refusal scaled to 9 µs for it: a shared
machine's neighbours slow both alike, so the scaled figure compares builds.

    python -m tests.bench_refusal [--rounds 5] [--requests 20000] [--refusal not-started]
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from typing import Any

import uvloop
from aiohttp import web

from flashsale.auth import TokenService
from flashsale.flash.cache import SaleState
from flashsale.plans import Switches
from flashsale.settings import Settings
from flashsale.stores.metrics import RequestStats, get_metrics
from gateway.fastjoin import JoinProtocol

CALIBRATION_US = 9.0  # sum(range(1000)) on a quiet core of this machine's kind


class _Transport:
    def __init__(self) -> None:
        self.last = b""

    def write(self, data: bytes) -> None:
        self.last = data

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else None


async def measure(
    rounds: int, requests: int, refusal: str = "sold-out"
) -> list[tuple[float, float]]:
    settings = Settings.from_env({}).with_(secret_key="m" * 40)
    tokens = TokenService(settings.secret, 3600)
    now = int(time.time() * 1000)
    sale = SaleState(
        id=7,
        sku_id=1,
        product_id=1,
        price_cents=100,
        original_price_cents=200,
        name="a sold-out sale",
        per_user_limit=1,
        start_ms=now - 1000 if refusal == "sold-out" else now + 3_600_000,
        end_ms=now + 7_200_000,
        window_ms=900_000,
        allotment=10,
        remaining=0,
        moved_out=0,
        closed=False,
    )
    server: Any = types.SimpleNamespace(
        app=web.Application(),
        joins=set(),
        keepalive_s=3600.0,
        access=None,
        max_body=settings.max_body_bytes,
        served=0,
        handed_over=0,
        tokens=tokens,
        switches=Switches(),
        stats=RequestStats(get_metrics()),
        cache=types.SimpleNamespace(sales={sale.id: sale}),
    )
    protocol = JoinProtocol(server)
    transport = _Transport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    request = (
        b"POST /api/v1/flash-sales/7/join HTTP/1.1\r\nHost: shop.example\r\n"
        b"User-Agent: bench\r\nAccept: */*\r\nAuthorization: Bearer "
        + tokens.issue(42, "user").encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n"
        + b'{"quantity": 1}'
    )
    protocol.data_received(request)
    if not transport.last.startswith(b"HTTP/1.1 409 "):
        raise RuntimeError(f"not a refusal: {transport.last[:200]!r}")
    out = []
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(requests):
            protocol.data_received(request)
        per = (time.process_time() - started) / requests * 1e6
        started = time.process_time()
        for _ in range(2000):
            sum(range(1000))
        calibration = (time.process_time() - started) / 2000 * 1e6
        out.append((per, calibration))
    protocol.connection_lost(None)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--refusal", choices=("sold-out", "not-started"), default="sold-out")
    args = p.parse_args(argv)
    for per, calibration in uvloop.run(measure(args.rounds, args.requests, args.refusal)):
        scaled = per / calibration * CALIBRATION_US
        print(f"{per:.1f} µs CPU per refusal; {scaled:.1f} µs scaled ({calibration:.1f} µs cal.)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
