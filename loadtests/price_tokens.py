"""What checking a bearer token costs a worker: a fresh token, and a crowd larger than the
cache (``python -m loadtests.price_tokens``).

Prints the CPU µs of one fresh token's full check (the best of ``--rounds`` passes over
``--fresh`` distinct tokens) and, for ``--crowd`` shoppers sending ``--requests`` requests
at random (or in turn, ``--in-turn``, as the bench's token files cycle) through a cache of
``--cache-size`` tokens, the share of requests that paid the full check, the mean µs per
request and what the cache holds in memory. Runs the token service alone, in this process:
no server, no network.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import tracemalloc

from flashsale.auth import TokenService
from flashsale.settings import TOKEN_CACHE_SIZE

SECRET = "price-tokens-" + "x" * 32


def fresh_check_us(service: TokenService, tokens: list[str], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for token in tokens:
            service._fast_verify(token)
        best = min(best, (time.process_time() - started) / len(tokens) * 1e6)
    return best


def crowd(
    service: TokenService, tokens: list[str], requests: int, *, in_turn: bool = False
) -> tuple[float, float]:
    """(share of requests that paid the full check, mean µs per request)."""
    full = 0
    check = service._fast_verify

    def counted(token: str) -> object:
        nonlocal full
        full += 1
        return check(token)

    service._fast_verify = counted  # type: ignore[method-assign,assignment]
    rng = random.Random(1)
    if in_turn:
        picks = [tokens[i % len(tokens)] for i in range(requests)]
    else:
        picks = [tokens[rng.randrange(len(tokens))] for _ in range(requests)]
    started = time.process_time()
    for token in picks:
        service.verify(token)
    spent = time.process_time() - started
    return full / requests, spent / requests * 1e6


def cache_bytes(tokens: list[str], size: int) -> int:
    """What a full cache of ``size`` verified tokens holds: its dict, the principals and the
    tokens' own strings (a worker's copies, decoded from each request's header), measured
    over as many of ``tokens`` as there are and scaled to ``size``."""
    service = TokenService(SECRET, 3600, cache_size=size + 1)
    own = [bytes(t, "ascii").decode() for t in tokens[:size]]  # new strings, as a header's
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for token in own:
        service.verify(token)
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    own_bytes = sum(sys.getsizeof(t) for t in own)
    return (held + own_bytes) * size // len(own)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--crowd", type=int, default=120_000)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--cache-size", type=int, default=TOKEN_CACHE_SIZE)
    parser.add_argument("--in-turn", action="store_true", help="the crowd cycles in order")
    args = parser.parse_args()
    service = TokenService(SECRET, 3600)
    fresh = [service.issue(uid, "user") for uid in range(1, args.fresh + 1)]
    print(f"a fresh token's check: {fresh_check_us(service, fresh, args.rounds):.2f} µs")
    tokens = [service.issue(uid, "user") for uid in range(1, args.crowd + 1)]
    service = TokenService(SECRET, 3600, cache_size=args.cache_size)
    share, mean = crowd(service, tokens, args.requests, in_turn=args.in_turn)
    order = "in turn" if args.in_turn else "at random"
    print(
        f"{args.crowd:,} shoppers {order} over a cache of {args.cache_size:,}, "
        f"{args.requests:,} requests: {share:.1%} paid the full check, "
        f"{mean:.2f} µs per request; {cache_bytes(tokens, args.cache_size) / 1e6:.1f} MB "
        f"held by a full cache"
    )


if __name__ == "__main__":
    main()
