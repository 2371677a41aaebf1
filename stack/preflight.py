"""Checks made before anything starts, each failing at once with one line that names
what is wrong and what to do: the HTTP port is taken, a given server does not answer."""

from __future__ import annotations

import asyncio
import re
import socket

from redis.exceptions import RedisError

from flashsale.settings import PREFIX, Settings
from flashsale.timing import PREFLIGHT_ANSWER_TIMEOUT_S


class PreflightFailed(Exception):
    """One line for the operator."""


def claim_port(host: str, port: int) -> socket.socket:
    """Fail if anything is bound to ``host:port``; else hold it for this stack.

    The gateway's workers share their port with ``SO_REUSEPORT``, so a second stack's
    workers would silently join the first one's. A bind with ``SO_REUSEADDR`` only (so that
    connections of a stack just stopped, in TIME_WAIT, do not count) fails while any socket
    listens there — ours or any other program's — or while another stack holds it. The
    socket returned is bound with ``SO_REUSEPORT`` only and never listens: this stack's
    workers join it, and the next stack's check fails. Keep it open while the stack runs.
    """
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind((host, port))
    except OSError as exc:
        raise PreflightFailed(
            f"{host}:{port} is already in use ({exc.strerror}): another flashsale or another "
            f"program listens there; stop it or set {PREFIX}HTTP_PORT"
        ) from None
    finally:
        probe.close()
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((host, port))
    return holder


def _shown(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//", url)  # never print a password


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {PREFLIGHT_ANSWER_TIMEOUT_S:.0f}s"
    text = str(exc).strip().splitlines()
    reason = text[0] if text else type(exc).__name__
    return f"{type(exc).__name__}: {reason}" if isinstance(exc, OSError) else reason


async def _redis(url: str) -> None:
    """PING with the URL's credentials, on every seed until one answers."""
    from redis.asyncio import Redis

    errors = []
    for seed in url.split(","):
        client = Redis.from_url(
            seed.strip(),
            socket_connect_timeout=PREFLIGHT_ANSWER_TIMEOUT_S,
            socket_timeout=PREFLIGHT_ANSWER_TIMEOUT_S,
            retry_on_timeout=False,
        )
        try:
            async with asyncio.timeout(PREFLIGHT_ANSWER_TIMEOUT_S):
                await client.ping()
        except (OSError, TimeoutError, RedisError) as exc:
            errors.append(_why(exc) if "," not in url else f"{_shown(seed.strip())}: {_why(exc)}")
            continue
        finally:
            await client.aclose()
        return
    raise _Unanswered("; ".join(errors))


async def _postgres(url: str) -> None:
    import asyncpg

    try:
        async with asyncio.timeout(PREFLIGHT_ANSWER_TIMEOUT_S):
            conn = await asyncpg.connect(url, timeout=PREFLIGHT_ANSWER_TIMEOUT_S)
            try:
                await conn.fetchval("SELECT 1")
            finally:
                await conn.close()
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise _Unanswered(_why(exc)) from None


async def _kafka(bootstrap: str) -> None:
    """A metadata request to every bootstrap server until one answers."""
    from aiokafka.conn import create_conn
    from aiokafka.errors import KafkaError
    from aiokafka.protocol.metadata import MetadataRequest

    errors = []
    for part in bootstrap.split(","):
        host, _, port = part.strip().rpartition(":")
        conn = None
        try:
            async with asyncio.timeout(PREFLIGHT_ANSWER_TIMEOUT_S):
                conn = await create_conn(
                    host or "127.0.0.1",
                    int(port or 9092),
                    request_timeout_ms=int(PREFLIGHT_ANSWER_TIMEOUT_S * 1000),
                )
                await conn.send(MetadataRequest([]))
        except (OSError, TimeoutError, KafkaError) as exc:
            errors.append(_why(exc) if "," not in bootstrap else f"{part.strip()}: {_why(exc)}")
            continue
        finally:
            if conn is not None:
                conn.close()
        return
    raise _Unanswered("; ".join(errors))


class _Unanswered(Exception):
    """Why a server did not answer its command."""


_CHECKS = {"redis_url": _redis, "database_url": _postgres, "kafka_bootstrap": _kafka}


def check_reachable(settings: Settings) -> None:
    """Every server URL that is set must answer a real command within a few seconds
    (Redis ``PING`` with its credentials, PostgreSQL ``SELECT 1``, a Kafka metadata request);
    raise PreflightFailed naming the first that does not, before anything starts."""
    given = {name: getattr(settings, name) for name in _CHECKS if getattr(settings, name)}
    if not given:
        return

    async def check_all() -> list[BaseException | None]:
        return await asyncio.gather(
            *(_CHECKS[name](url) for name, url in given.items()), return_exceptions=True
        )

    for (name, url), outcome in zip(given.items(), asyncio.run(check_all()), strict=True):
        if isinstance(outcome, _Unanswered):
            raise PreflightFailed(
                f"{PREFIX}{name.upper()}={_shown(url)} does not answer ({outcome}); start it, "
                "fix the URL or its password, or unset it to let `flashsale up` start its own"
            )
        if isinstance(outcome, BaseException):
            raise outcome
