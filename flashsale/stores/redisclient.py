"""Opening Redis: one node or a Redis Cluster (``FLASHSALE_REDIS_CLUSTER``), one code path.

On a cluster every client is redis-py's ``RedisCluster``: it routes each command by the
slot of its key, follows MOVED/ASK and refreshes its slot map after a failover. Every key
one command, transaction or script touches shares one hash tag (``flashsale/stores/rediskeys.py``),
so the callers need not know which they talk to; ``RedisCluster`` is typed as ``Redis``
here because the code only uses the single-slot commands both implement. The two things a
cluster does differently are here: a server's run id belongs to the node that holds a key
(:func:`run_ids`), and publish/subscribe goes through one node's plain connection
(:func:`pubsub_client`; a cluster forwards every PUBLISH to all its nodes).
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator, Sequence
from typing import Any, Final, cast
from urllib.parse import unquote, urlsplit

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

from flashsale.settings import Settings
from flashsale.stores.redisbatch import run_id_of
from flashsale.timing import CONNECT_TIMEOUT_S

# Where redis-py 8.1's asyncio connection leaks a transport error instead of its own
# ConnectionError, when another task closed the connection under a write (it does during a
# cluster failover): redis/redis-py#4287, #3546. The error comes from the writer's frames:
# redis-py's own, asyncio's streams and transports, or uvloop's (RuntimeError "the handler
# is closed", raised from ``uvloop/handles/*.pyx``).
_TRANSPORT_FILES: Final = ("/redis/asyncio/connection.py", "/asyncio/streams.py", "_events.py")


def lost_connection(exc: BaseException) -> bool:
    """Whether ``exc`` means a connection to Redis went away under a command: redis-py's
    ConnectionError or TimeoutError, a cluster client that reached none of its nodes (its
    RedisClusterException is not a RedisError), or the AttributeError/TypeError/RuntimeError its
    asyncio connection leaks when the connection was closed mid-write (nothing was answered: the
    caller may answer 503 and let the client retry)."""
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | RedisClusterException):
        return True
    if not isinstance(exc, AttributeError | TypeError | RuntimeError):
        return False
    files = [f.f_code.co_filename for f, _ in traceback.walk_tb(exc.__traceback__)]
    if not files or not any("/redis/asyncio/" in name for name in files):
        return False
    return files[-1].endswith(_TRANSPORT_FILES) or files[-1].startswith("uvloop/handles/")


@contextlib.contextmanager
def leaks_as_connection_errors() -> Iterator[None]:
    """Inside, a transport error leaked by redis-py (see :func:`lost_connection`) is
    raised as redis-py's ConnectionError, so a background loop's ``except RedisError``
    keeps it alive (a dead cache, revocation or lease loop would serve stale state)."""
    try:
        yield
    except (AttributeError, TypeError, RuntimeError) as exc:
        if lost_connection(exc):
            raise RedisConnectionError(f"connection lost under the command: {exc!r}") from exc
        raise


def _node(url: str) -> ClusterNode:
    parts = urlsplit(url)
    return ClusterNode(parts.hostname or "127.0.0.1", parts.port or 6379)


def open_redis(settings: Settings, **options: Any) -> Redis:
    """A client of ``FLASHSALE_REDIS_URL``: ``Redis``, or ``RedisCluster`` on a cluster."""
    if not settings.redis_cluster:
        client: Redis = Redis.from_url(settings.redis, **options)
        return client
    seeds = settings.redis_seeds
    first = urlsplit(seeds[0])
    options.pop("max_connections", None)  # per node in RedisCluster: keep its default
    options.pop("health_check_interval", None)
    cluster = RedisCluster(
        startup_nodes=[_node(u) for u in seeds],
        username=unquote(first.username) if first.username else None,
        password=unquote(first.password) if first.password else None,
        **options,
    )
    return cast(Redis, cluster)


async def run_ids(redis: Redis, keys: Sequence[str]) -> list[str]:
    """The run id of the server that holds each of ``keys`` (one ``INFO`` per server)."""
    if not keys:
        return []
    if not isinstance(redis, RedisCluster):
        info = await redis.execute_command("INFO", "server")  # type: ignore[no-untyped-call]
        return [run_id_of(info)] * len(keys)
    cluster: RedisCluster = redis
    await cluster.initialize()  # the slot map (a no-op once read)
    by_node: dict[str, str] = {}
    out: list[str] = []
    for key in keys:
        node = cluster.get_node_from_key(key)
        assert node is not None
        if node.name not in by_node:
            info = await cluster.execute_command("INFO", "server", target_nodes=node)
            by_node[node.name] = run_id_of(info)
        out.append(by_node[node.name])
    return out


async def run_id(redis: Redis, key: str) -> str:
    """The run id of the server that holds ``key``."""
    return (await run_ids(redis, [key]))[0]


def pubsub_client(redis: Redis) -> tuple[Redis, bool]:
    """A client to subscribe with, and whether the caller must close it.

    A cluster node forwards every PUBLISH to the whole cluster, so subscribing on any
    one node hears every message; redis-py's async cluster client has no pub/sub.
    """
    if not isinstance(redis, RedisCluster):
        return redis, False
    node = redis.get_random_node()
    kwargs = redis.get_connection_kwargs()
    client = Redis(
        host=node.host,
        port=node.port,
        username=kwargs.get("username"),
        password=kwargs.get("password"),
        socket_connect_timeout=CONNECT_TIMEOUT_S,
    )
    return client, True
