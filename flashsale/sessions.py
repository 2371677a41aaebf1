"""Token revocation: one generation number per user, refused on every worker within a second.

A token carries the user's generation (claim ``gen``) at the time it was issued. A role
or password change, disabling the account or logging out bumps the generation in
PostgreSQL (``users.token_gen``) and, in the same step, in Redis:

* ``fs:{auth}:gen``, a hash user id → generation (only users ever revoked have an entry);
* ``fs:{auth}:gen:version``, a counter bumped with every write to that hash;
* ``fs:auth:revoked``, a pub/sub channel that carries ``"<user id>:<generation>"``.

Each worker keeps the hash as a plain dict (:class:`Revocations`). A subscriber task
applies every message as it arrives, so a revoked token is refused everywhere within
milliseconds; a poller re-reads the version every ``revocation_reload_ms`` and reloads
the whole hash when it moved (a message lost with a dropped connection), and re-seeds the
hash from PostgreSQL if Redis lost it (``fs:{auth}:gen:seeded`` gone). The check on each
request is a dict lookup with no I/O.

Fail-closed: every successful poll confirms the map. If a worker cannot reach Redis for
``revocation_max_stale_s`` seconds, it can no longer vouch that a token was not revoked,
and authenticated requests get 503 ``AUTH_UNAVAILABLE`` (anonymous ones still pass) until
Redis answers again.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

import asyncpg
from redis.asyncio import Redis

from flashsale.errors import ServiceUnavailable
from flashsale.stores.follow import followed
from flashsale.stores.redisclient import leaks_as_connection_errors
from flashsale.stores.rediskeys import (
    AUTH_GENERATIONS,
    AUTH_GENERATIONS_SEEDED,
    AUTH_GENERATIONS_VERSION,
    AUTH_REVOKED,
)
from flashsale.stores.tasks import STORE_ERRORS, STORE_OR_DATABASE_ERRORS

log = logging.getLogger(__name__)

SQL_REVOKED_USERS = "SELECT id, token_gen FROM users WHERE token_gen > 0"


class Revocations:
    """This worker's copy of the user → generation hash."""

    def __init__(self, *, max_stale_s: float) -> None:
        self.generations: dict[int, int] = {}
        self.max_stale_s = max_stale_s
        self.synced_at = 0.0  # time.time() when Redis last confirmed the map
        self._version: bytes | None = None

    def current(self, user_id: int) -> int:
        return self.generations.get(user_id, 0)

    def apply(self, user_id: int, gen: int) -> None:
        """Generations only grow, so every update is a max (order of arrival does not matter)."""
        if gen > self.generations.get(user_id, 0):
            self.generations[user_id] = gen

    def apply_message(self, data: bytes) -> None:
        user, _, gen = data.partition(b":")
        if user.isdigit() and gen.isdigit():
            self.apply(int(user), int(gen))

    async def refresh(self, redis: Redis, db: asyncpg.Pool) -> None:
        """Confirm the map with Redis; reload the hash if it changed, seed it if it was lost."""
        async with redis.pipeline(transaction=True) as pipe:
            pipe.get(AUTH_GENERATIONS_VERSION)
            pipe.exists(AUTH_GENERATIONS_SEEDED)
            version, seeded = await pipe.execute()
        if not seeded:
            await seed(redis, db)
            version = None
        if version is None or version != self._version:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.get(AUTH_GENERATIONS_VERSION)
                pipe.hgetall(AUTH_GENERATIONS)
                version, entries = await pipe.execute()
            for user, gen in entries.items():
                self.apply(int(user), int(gen))
            self._version = version
        self.synced_at = time.time()


async def seed(redis: Redis, db: asyncpg.Pool) -> None:
    """Copy the generations PostgreSQL knows into Redis (after Redis lost its data).

    HSETNX, so a bump written meanwhile (always the newer value) is never overwritten.
    """
    rows = await db.fetch(SQL_REVOKED_USERS)
    async with redis.pipeline(transaction=True) as pipe:
        for row in rows:
            pipe.hsetnx(AUTH_GENERATIONS, str(row["id"]), row["token_gen"])
        pipe.incr(AUTH_GENERATIONS_VERSION)
        pipe.set(AUTH_GENERATIONS_SEEDED, b"1")
        await pipe.execute()
    log.info("seeded %d token generation(s) from PostgreSQL", len(rows))


async def publish(redis: Redis, user_id: int, gen: int) -> None:
    """Record a bumped generation and tell every worker. Called while the row is locked."""
    try:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hset(AUTH_GENERATIONS, str(user_id), gen)
            pipe.incr(AUTH_GENERATIONS_VERSION)
            pipe.publish(AUTH_REVOKED, f"{user_id}:{gen}")
            await pipe.execute()
    except STORE_ERRORS as exc:
        raise ServiceUnavailable("cannot record the revocation; nothing was changed") from exc


@contextlib.asynccontextmanager
async def kept_fresh(
    revocations: Revocations, redis: Redis, db: asyncpg.Pool, *, every_s: float
) -> AsyncIterator[None]:
    """Load the map before serving, then keep it fresh with a subscriber and a poller.

    A store that is down at start does not stop the worker (crash-only processes serve
    what they can): the map stays unconfirmed, so requests that carry a token are refused
    (fail closed) until the poller gets through.
    """
    try:
        with leaks_as_connection_errors():
            await revocations.refresh(redis, db)
    except STORE_OR_DATABASE_ERRORS as exc:
        log.warning("revocation list not loaded at start (%s); tokens wait for it", exc)
    async with followed(
        redis,
        AUTH_REVOKED,
        lambda: revocations.refresh(redis, db),
        every_s=every_s,
        what="revocation list",
        on_message=revocations.apply_message,
        errors=STORE_OR_DATABASE_ERRORS,
    ):
        yield
