"""Demo data added by feature areas on top of the base catalog."""

from __future__ import annotations

from typing import Any

import asyncpg

from gateway.settings import Settings


async def after_catalog(settings: Settings, pool: asyncpg.Pool, *, created: bool) -> dict[str, Any]:
    return {}
