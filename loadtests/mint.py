"""Users and bearer tokens for load tests, minted fast.

One argon2 hash is computed once (of :data:`BENCH_PASSWORD`) and shared by every
user, the rows go in with one ``INSERT ... SELECT generate_series`` per batch, and
tokens are signed locally with :class:`flashsale.auth.TokenService` — no password
hashing and no login request per virtual user.

    FLASHSALE_DATABASE_URL=... FLASHSALE_SECRET_KEY=... \\
        python -m loadtests.mint --count 10000 --out tokens.txt [--role user]

The output has one token per line (the user id is the token's ``sub``); the
Locust scenarios read it from ``$LOCUST_TOKENS_FILE`` and the benchmark passes it
to the load generator.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from functools import cache
from pathlib import Path

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from flashsale.auth import TokenService
from flashsale.settings import Settings
from stack import stackfile

BENCH_PASSWORD = "bench-password-1"
BATCH = 50_000
SQL_INSERT_USERS = """
INSERT INTO users (email, password_hash, nickname, role)
SELECT 'load-' || $1::text || '-' || g || '@bench.local', $2, 'load-' || g, $3
FROM generate_series(1, $4::int) AS g
RETURNING id
"""

# A default address each, as a real shopper has: a flash order is paid only with one.
SQL_INSERT_ADDRESSES = """
INSERT INTO addresses (user_id, name, phone, region, city, detail, is_default)
SELECT u, 'Load Test', '13800000000', 'Region', 'Y City', '1 Bench Road', true
FROM unnest($1::bigint[]) AS u
"""


@cache
def shared_hash() -> str:
    from argon2 import PasswordHasher

    return PasswordHasher().hash(BENCH_PASSWORD)


async def insert_users(
    conn: asyncpg.Connection | PoolConnectionProxy, count: int, role: str = "user"
) -> list[int]:
    """Insert ``count`` users sharing one password hash; return their ids in order."""
    ids: list[int] = []
    tag = secrets.token_hex(5)
    while len(ids) < count:
        n = min(BATCH, count - len(ids))
        rows = await conn.fetch(SQL_INSERT_USERS, f"{tag}-{len(ids)}", shared_hash(), role, n)
        batch = [int(r["id"]) for r in rows]
        if role == "user":
            await conn.execute(SQL_INSERT_ADDRESSES, batch)
        ids.extend(batch)
    return ids


def issue_tokens(tokens: TokenService, user_ids: list[int], role: str = "user") -> list[str]:
    return [tokens.issue(uid, role) for uid in user_ids]


def write_tokens(path: Path, tokens: list[str]) -> None:
    path.write_text("\n".join(tokens) + "\n", encoding="ascii")


async def mint(settings: Settings, count: int, out: Path, role: str = "user") -> list[int]:
    """Create ``count`` users, write their tokens to ``out``; return the user ids."""
    conn = await asyncpg.connect(settings.database)
    try:
        ids = await insert_users(conn, count, role)
    finally:
        await conn.close()
    service = TokenService(settings.secret, settings.token_ttl_s)
    write_tokens(out, issue_tokens(service, ids, role))
    return ids


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="mint load-test users and tokens")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--role", default="user", choices=["user", "merchant", "admin"])
    args = p.parse_args(argv)
    settings = stackfile.fill(Settings.from_env()).require("database_url", "secret_key")
    ids = asyncio.run(mint(settings, args.count, args.out, args.role))
    print(f"minted {len(ids)} {args.role} tokens into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
