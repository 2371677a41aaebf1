"""One process's figures into Redis once a second: what changed since its last publish."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import time
import weakref
from collections.abc import Callable, Collection, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from redis.asyncio import Redis
from redis.exceptions import RedisError

from flashsale.dashboard.totals import LATENCY_FIELD, counter_fields, gauge_fields, read_metrics
from flashsale.stores import tasks
from flashsale.stores.rediskeys import DASH_TOTALS, dash_second
from flashsale.timing import DASH_LAST_PUBLISH_S, DASH_SECOND_TTL_S


def own_families(registry: CollectorRegistry | None) -> list[Metric]:
    """THIS process's samples (with a multiprocess directory too: each metric's values are
    this process's own file), never the whole folder's."""
    from prometheus_client import REGISTRY

    return list((registry or REGISTRY).collect())


def process_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Publisher:
    """One process's figures into Redis, once a second: what changed since the last publish.

    Costs one pipelined round trip per call with a bounded number of fields (statuses,
    refusal codes, latency bins, gauges), however many requests the second carried;
    nothing on the request path. A failed write keeps its deltas for the next call.
    ``join_routes`` are the route templates of the HTTP layer's join routes.
    """

    def __init__(
        self,
        collect: Callable[[], Iterable[Metric]],
        process: str,
        join_routes: Collection[str] = (),
    ) -> None:
        self._collect = collect
        self._process = process
        self.join_routes = frozenset(join_routes)
        self._sent: dict[str, float] = {}
        self.published = 0  # successful publishes
        self.last_commands = 0  # Redis commands the last one sent (the bench reports it)

    async def publish(self, redis: Redis, second: int | None = None) -> None:
        t = read_metrics(self._collect(), self.join_routes)
        changed = {
            name: round(total - self._sent.get(name, 0.0))
            for name, total in counter_fields(t).items()
        }
        # every latency bound once any moved: quantiles interpolate from the bound below
        timed = any(n for name, n in changed.items() if name.startswith(LATENCY_FIELD))
        deltas = {n: d for n, d in changed.items() if d or (timed and n.startswith(LATENCY_FIELD))}
        for name, n in deltas.items():
            # taken before the await: a second caller in this process (the consumer and
            # the gateway in one test process) sees no delta twice
            self._sent[name] = self._sent.get(name, 0.0) + n
        key = dash_second(int(time.time()) if second is None else second)
        pipe = redis.pipeline(transaction=False)
        for name, n in deltas.items():
            pipe.hincrby(key, name, n)
            pipe.hincrby(DASH_TOTALS, name, n)
        pipe.hset(key, mapping=gauge_fields(t, self._process))  # type: ignore[arg-type]
        pipe.expire(key, DASH_SECOND_TTL_S)
        try:
            self.last_commands = len(pipe)
            await pipe.execute()
        except BaseException:
            for name, n in deltas.items():
                self._sent[name] -= n
            raise
        self.published += 1


_PUBLISHERS: weakref.WeakKeyDictionary[CollectorRegistry, Publisher] = weakref.WeakKeyDictionary()


def publisher_for(
    registry: CollectorRegistry | None, join_routes: Collection[str] = ()
) -> Publisher:
    """The one publisher of a registry in this process (the gateway app and an in-process
    consumer sharing a registry must not publish its counts twice); it counts the joins of
    every ``join_routes`` any of its callers named."""
    from prometheus_client import REGISTRY

    reg = registry or REGISTRY
    pub = _PUBLISHERS.get(reg)
    if pub is None:
        pub = _PUBLISHERS[reg] = Publisher(functools.partial(own_families, reg), process_name())
    pub.join_routes |= frozenset(join_routes)
    return pub


async def publish_every_second(
    redis: Redis,
    registry: CollectorRegistry | None,
    before: Callable[[], None] | None = None,
    stop: asyncio.Event | None = None,
    join_routes: Collection[str] = (),
) -> None:
    """The once-a-second publish loop of a gateway worker or a consumer; ``before`` runs
    first (the gateway's request-stats flush), ``join_routes`` name the gateway's join
    routes. Ends when ``stop`` is set or on cancel, after one last publish."""
    pub = publisher_for(registry, join_routes)

    async def step() -> None:
        if before is not None:
            before()
        await pub.publish(redis)

    try:
        await tasks.guarded_loop(
            step, name="dashboard publish", every_s=1.0, wait_first=True, stop=stop
        )
    finally:
        if before is not None:
            before()
        # the last second's figures, unless Redis is already gone (shutdown must not hang)
        with contextlib.suppress(RedisError, OSError, RuntimeError, TimeoutError):
            await asyncio.wait_for(pub.publish(redis), DASH_LAST_PUBLISH_S)
