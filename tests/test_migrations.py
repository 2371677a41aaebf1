from __future__ import annotations

import asyncpg
import pytest

from flashsale.stores.db import Migration, MigrationError, load_migrations, migrate

pytestmark = pytest.mark.integration


async def test_migrate_twice_is_noop(db: asyncpg.Pool) -> None:
    async with db.acquire() as conn:
        assert await migrate(conn) == []
        assert await migrate(conn) == []
        versions = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")]
    assert sorted(versions) == [m.version for m in load_migrations()]


async def test_changed_migration_refused(db: asyncpg.Pool) -> None:
    first = load_migrations()[0]
    async with db.acquire() as conn:
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await migrate(conn, [Migration(first.version, first.sql + "\n-- edited\n")])


async def test_failed_migration_rolls_back(db: asyncpg.Pool) -> None:
    bad = Migration("9999_bad", "CREATE TABLE tmp_half (id int); SELECT * FROM no_such_table;")
    async with db.acquire() as conn:
        with pytest.raises(MigrationError, match="9999_bad"):
            await migrate(conn, [*load_migrations(), bad])
        assert await conn.fetchval("SELECT to_regclass('tmp_half')") is None
        assert (
            await conn.fetchval("SELECT count(*) FROM schema_migrations WHERE version = '9999_bad'")
            == 0
        )
