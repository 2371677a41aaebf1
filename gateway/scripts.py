"""Lua scripts: loaded once from ``lua/*.lua`` and registered on a client.

Calls go through redis-py's script objects: EVALSHA, with a reload on NOSCRIPT
(after a Redis restart or SCRIPT FLUSH).
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript


@cache
def source(name: str) -> str:
    """The text of ``lua/<name>.lua``."""
    return (resources.files("lua") / f"{name}.lua").read_text(encoding="utf-8")


def register(client: Redis, name: str) -> AsyncScript:
    return client.register_script(source(name))
