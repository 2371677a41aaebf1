"""Which errors mean "the Redis connection went away under a command" (a retriable 503)."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from flashsale.stores.redisclient import leaks_as_connection_errors, lost_connection
from tests.faultkit import leaked_transport_error

pytestmark = pytest.mark.unit


async def test_a_write_on_a_connection_closed_under_it_is_a_lost_connection() -> None:
    """redis-py 8.1 leaks AttributeError from its writer when another task closed the
    connection mid-write (what a cluster failover does): seen in the two-failover chaos
    run as a 500. The same call on a closed connection raises it here, from redis-py's
    own frames."""
    conn = Connection(host="127.0.0.1", port=1)  # never connected: no writer, as after close
    with pytest.raises(AttributeError) as caught:
        await conn._send_packed_command([b"*1\r\n$4\r\nPING\r\n"])
    assert lost_connection(caught.value)


async def test_a_write_on_a_transport_closed_under_it_is_a_lost_connection() -> None:
    """The same race on uvloop (the service's loop, and this suite's): the transport is
    closed, and its write raises RuntimeError "the handler is closed" (the second 500
    of the two-failover chaos run)."""
    assert lost_connection(await leaked_transport_error())


def test_other_errors_are_not() -> None:
    assert lost_connection(RedisConnectionError("reset by peer"))
    assert not lost_connection(ResponseError("WRONGTYPE"))
    try:
        None.writelines  # type: ignore[attr-defined]  # noqa: B018 (an AttributeError of ours)
    except AttributeError as exc:
        assert not lost_connection(exc)
    assert not lost_connection(AttributeError("no traceback at all"))
    assert not lost_connection(RuntimeError("a bug of ours"))


async def test_background_loops_see_a_leak_as_a_connection_error() -> None:
    """The sale-cache, revocation, lease, waiting-room and dashboard loops catch
    RedisError: inside ``leaks_as_connection_errors`` a leak is one, so they live on."""
    conn = Connection(host="127.0.0.1", port=1)
    with pytest.raises(RedisConnectionError), leaks_as_connection_errors():
        await conn._send_packed_command([b"*1\r\n$4\r\nPING\r\n"])
    with pytest.raises(AttributeError), leaks_as_connection_errors():
        None.anything  # type: ignore[attr-defined]  # noqa: B018 (a bug stays a bug)
