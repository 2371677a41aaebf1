"""PostgreSQL: the connection pool and the migration runner.

Migrations are the numbered ``flashsale/migrations/NNNN_name.sql`` files, applied in
order, each in its own transaction, and recorded with a checksum in
``schema_migrations``. Running twice is a no-op; a file changed after it was
applied is refused rather than silently diverging from the databases that ran it.
"""

from __future__ import annotations

import hashlib
import logging
import traceback
from dataclasses import dataclass
from importlib import resources
from typing import Final

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from flashsale.timing import CONNECT_TIMEOUT_S, SQL_COMMAND_TIMEOUT_S

# A connection from a pool or a plain one: what the data functions accept.
Conn = asyncpg.Connection | PoolConnectionProxy

log = logging.getLogger(__name__)

# A fixed key for pg_advisory_xact_lock so that two `migrate` runs never interleave.
MIGRATION_LOCK_KEY = 7_350_001

SQL_CREATE_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    TEXT PRIMARY KEY,
    checksum   TEXT        NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""
SQL_LOCK = "SELECT pg_advisory_xact_lock($1)"
SQL_APPLIED = "SELECT version, checksum FROM schema_migrations"
SQL_RECORD = "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)"


class MigrationError(Exception):
    """A migration file no longer matches what was applied, or failed to apply."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations() -> list[Migration]:
    """Every migration file shipped with the package, in version order."""
    folder = resources.files("flashsale") / "migrations"
    out = [
        Migration(version=entry.name.removesuffix(".sql"), sql=entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    ]
    return sorted(out, key=lambda m: m.version)


async def migrate(conn: Conn, migrations: list[Migration] | None = None) -> list[str]:
    """Apply pending migrations; return the versions applied now."""
    todo = load_migrations() if migrations is None else migrations
    applied_now: list[str] = []
    async with conn.transaction():
        await conn.execute(SQL_LOCK, MIGRATION_LOCK_KEY)
        await conn.execute(SQL_CREATE_MIGRATIONS)
        applied = {r["version"]: r["checksum"] for r in await conn.fetch(SQL_APPLIED)}
        for m in todo:
            if m.version in applied:
                if applied[m.version] != m.checksum:
                    raise MigrationError(
                        f"migration {m.version} was changed after it was applied; "
                        "add a new migration instead of editing an applied one"
                    )
                continue
            try:
                async with conn.transaction():
                    await conn.execute(m.sql)
                    await conn.execute(SQL_RECORD, m.version, m.checksum)
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"migration {m.version} failed: {exc}") from exc
            log.info("applied migration %s", m.version)
            applied_now.append(m.version)
    return applied_now


async def init_connection(conn: asyncpg.Connection) -> None:
    """What each connection of :func:`create_pool` gets: json and jsonb as orjson values. A
    lone connection that must read and write them as the pool does gets it too."""
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(
            typename,
            encoder=lambda v: orjson.dumps(v).decode(),
            decoder=orjson.loads,
            schema="pg_catalog",
        )


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 10) -> asyncpg.Pool:
    """A pool whose connections encode and decode json/jsonb with orjson."""
    pool: asyncpg.Pool | None = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=init_connection,
        command_timeout=SQL_COMMAND_TIMEOUT_S,
        timeout=CONNECT_TIMEOUT_S,
    )
    assert pool is not None
    return pool


# What PostgreSQL answers when it is going away, starting up or full: connection errors
# (class 08), operator intervention (57: admin or crash shutdown, "cannot connect now",
# a statement cancelled) and too many connections. None says the request was wrong.
_SERVER_GONE: Final = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TooManyConnectionsError,
)
# What asyncpg raises itself when the server is out of reach: the socket refused or reset
# (OSError), a connect, command or acquire deadline (TimeoutError), and the state a
# connection is left in when it was lost under a statement (InterfaceError "connection is
# closed", InternalClientError "cannot switch to state"). Only from asyncpg's own frames:
# the same classes raised by our code are bugs.
_CLIENT_GONE: Final = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)


def reference_gone(exc: BaseException) -> bool:
    """Whether ``exc`` is a write refused because a row it refers to is gone (a foreign
    key): the account a token names removed, a product or address deleted meanwhile. The
    statement was rolled back; the request named something that no longer exists."""
    return isinstance(exc, asyncpg.ForeignKeyViolationError)


def lost_database(exc: BaseException) -> bool:
    """Whether ``exc`` means PostgreSQL could not be reached or went away under a statement
    (the caller may answer 503 and let the client retry), rather than a wrong request."""
    if isinstance(exc, _SERVER_GONE):
        return True
    if not isinstance(exc, _CLIENT_GONE) or isinstance(exc, asyncpg.DataError):
        return False  # DataError: a value asyncpg could not encode, a bug of ours
    return any(
        "/asyncpg/" in name or name.startswith("asyncpg/")
        for name in (f.f_code.co_filename for f, _ in traceback.walk_tb(exc.__traceback__))
    )
