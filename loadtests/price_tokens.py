"""What checking a bearer token costs a worker: a fresh token, and a crowd larger than the
cache (``python -m loadtests.price_tokens``).

Prints the CPU µs of one fresh token's full check (the best of ``--rounds`` passes over
``--fresh`` distinct tokens) and, for ``--crowd`` shoppers sending ``--requests`` requests
at random, the share of requests that paid the full check and the mean µs per request.
Runs the token service alone, in this process: no server, no network.
"""

from __future__ import annotations

import argparse
import random
import time

from flashsale.auth import TokenService

SECRET = "price-tokens-" + "x" * 32


def fresh_check_us(service: TokenService, tokens: list[str], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for token in tokens:
            service._fast_verify(token)
        best = min(best, (time.process_time() - started) / len(tokens) * 1e6)
    return best


def crowd(service: TokenService, tokens: list[str], requests: int) -> tuple[float, float]:
    """(share of requests that paid the full check, mean µs per request)."""
    full = 0
    check = service._fast_verify

    def counted(token: str) -> object:
        nonlocal full
        full += 1
        return check(token)

    service._fast_verify = counted  # type: ignore[method-assign,assignment]
    rng = random.Random(1)
    picks = [tokens[rng.randrange(len(tokens))] for _ in range(requests)]
    started = time.process_time()
    for token in picks:
        service.verify(token)
    spent = time.process_time() - started
    return full / requests, spent / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--crowd", type=int, default=120_000)
    parser.add_argument("--requests", type=int, default=1_000_000)
    args = parser.parse_args()
    service = TokenService(SECRET, 3600)
    fresh = [service.issue(uid, "user") for uid in range(1, args.fresh + 1)]
    print(f"a fresh token's check: {fresh_check_us(service, fresh, args.rounds):.2f} µs")
    tokens = [service.issue(uid, "user") for uid in range(1, args.crowd + 1)]
    share, mean = crowd(TokenService(SECRET, 3600), tokens, args.requests)
    print(
        f"{args.crowd:,} shoppers at random, {args.requests:,} requests: "
        f"{share:.1%} paid the full check, {mean:.2f} µs per request"
    )


if __name__ == "__main__":
    main()
