"""Kafka: topic set-up and the order-event producer.

The producer awaits the broker's ack (``acks=all``) for every accepted order, but
many requests share one batch: each request ``send``s and awaits its own future
while aiokafka's sender packs concurrent sends together (``linger_ms``).

One code path for the embedded broker (tansu) and Apache Kafka; three settings say what
the deployment's brokers can do, and nothing else differs:

- ``FLASHSALE_KAFKA_ENABLE_IDEMPOTENCE``: tansu answers ``InitProducerId`` with an
  error, so it is off by default and on in compose (a retried batch is then never
  written twice; the consumer is idempotent by order id either way).
- ``FLASHSALE_KAFKA_REPLICATION_FACTOR`` and ``FLASHSALE_KAFKA_MIN_INSYNC_REPLICAS``:
  the topics are created with them (3 and 2 in compose; with ``acks=all`` an accepted
  order is then on two brokers before its 202). tansu accepts and ignores them: its
  storage engine, not broker replicas, holds the data.
- ``FLASHSALE_KAFKA_ASSIGNOR``: aiokafka implements only the eager rebalance protocol
  (no cooperative-sticky, aio-libs/aiokafka#1126); ``sticky`` keeps each consumer's
  partitions across a rebalance, which is what cooperative-sticky adds to, and offsets
  committed only after the database commit make the stop-the-world revocation safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from flashsale.settings import Settings
from flashsale.stores import tasks

log = logging.getLogger(__name__)


class PublishFailed(Exception):
    """The broker did not acknowledge the event within the bound."""


async def ensure_topics(settings: Settings, *, timeout_s: float = 15.0) -> None:
    """Create the orders and dead-letter topics if they do not exist yet."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka, request_timeout_ms=5000)
    await asyncio.wait_for(admin.start(), timeout_s)
    try:
        existing = set(await admin.list_topics())
        replicas = settings.kafka_replication_factor
        configs = {"min.insync.replicas": str(settings.kafka_min_insync_replicas)}
        wanted = [
            NewTopic(
                settings.kafka_orders_topic,
                settings.kafka_partitions,
                replicas,
                topic_configs=configs,
            ),
            NewTopic(settings.kafka_dlq_topic, 1, replicas, topic_configs=configs),
        ]
        missing = [t for t in wanted if t.name not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
            log.info("created topics %s", [t.name for t in missing])
    finally:
        await admin.close()


async def group_state(settings: Settings, *, timeout_s: float = 10.0) -> tuple[str, int]:
    """The consumer group's state (``Stable``, ``PreparingRebalance``, …) and member count."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka, request_timeout_ms=5000)
    await asyncio.wait_for(admin.start(), timeout_s)
    try:
        responses = await asyncio.wait_for(
            admin.describe_consumer_groups([settings.kafka_consumer_group]), timeout_s
        )
    finally:
        await admin.close()
    for response in responses:
        for group in response.to_object()["groups"]:
            if group["group"] == settings.kafka_consumer_group:
                return str(group["state"]), len(group["members"])
    return "Dead", 0


ASSIGNORS: dict[str, type[AbstractPartitionAssignor]] = {
    "sticky": StickyPartitionAssignor,
    "roundrobin": RoundRobinPartitionAssignor,
    "range": RangePartitionAssignor,
}


def assignor(settings: Settings) -> tuple[type[AbstractPartitionAssignor], ...]:
    """The consumers' partition assignment strategy (``FLASHSALE_KAFKA_ASSIGNOR``)."""
    return (ASSIGNORS[settings.kafka_assignor],)


def _expire(waiters: list[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_exception(TimeoutError("the broker did not acknowledge in time"))


def _fail_all(waiters: list[asyncio.Future[None]], exc: BaseException) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_exception(exc)


class OrderProducer:
    """Produces order events, keyed by order id (spread over every partition)."""

    def __init__(self, settings: Settings, *, topic: str | None = None) -> None:
        self._settings = settings
        self.topic = topic or settings.kafka_orders_topic
        self._timeout_s = settings.kafka_produce_timeout_ms / 1000
        self._producer: AIOKafkaProducer | None = None
        self._queued: list[tuple[bytes, bytes, asyncio.Future[None]]] = []
        # the waiters queued since the last shipment: one expiry timer covers them all
        self._waiters: list[asyncio.Future[None]] = []
        self._wakeup = asyncio.Event()
        self._shipper: asyncio.Task[None] | None = None
        self._turn = random.randrange(1 << 16)  # workers start on different partitions

    async def start(self) -> None:
        await ensure_topics(self._settings)
        producer = AIOKafkaProducer(
            bootstrap_servers=self._settings.kafka,
            acks="all",
            enable_idempotence=self._settings.kafka_enable_idempotence,
            linger_ms=self._settings.kafka_linger_ms,
            request_timeout_ms=max(self._settings.kafka_produce_timeout_ms, 1000),
            max_batch_size=256 * 1024,
            client_id="flashsale-gateway",
        )
        await producer.start()
        self._producer = producer
        self._shipper = asyncio.create_task(self._ship_forever(), name="order-event-shipper")

    async def stop(self) -> None:
        shipper, self._shipper = self._shipper, None
        if shipper is not None:
            if self._queued:  # what is queued goes out (or fails) before the producer closes
                queued, self._queued = self._queued, []
                await self._send_queued(queued)
            await tasks.stop(shipper)
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def __aenter__(self) -> OrderProducer:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("producer is not started")
        return self._producer

    async def publish(self, key: bytes, value: bytes) -> None:
        """Queue an order event, await the broker's ack; PublishFailed after the bound.

        One shipper task sends whatever was queued while the previous record batch was
        being handed over, as one batch (``create_batch``/``send_batch``) to the next
        partition in turn: one future and one metadata check per batch instead of per
        event. On a timeout the batch is not cancelled (it may still land; the consumer's
        claim in Redis then decides whether it is written).
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        if not self._waiters:  # one timer per tick's events, not one per event
            self._waiters = []
            loop.call_later(self._timeout_s, _expire, self._waiters)
        self._waiters.append(waiter)
        self._queued.append((key, value, waiter))
        self._wakeup.set()
        try:
            await waiter
        except (TimeoutError, KafkaError, OSError) as exc:
            raise PublishFailed(f"{type(exc).__name__}: {exc}") from exc

    async def _ship_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queued:
                queued, self._queued = self._queued, []
                self._waiters = []
                try:
                    await self._send_queued(queued)
                except Exception as exc:
                    log.exception("shipping %d order event(s) failed", len(queued))
                    _fail_all([w for *_, w in queued], exc)

    async def _send_queued(self, queued: list[tuple[bytes, bytes, asyncio.Future[None]]]) -> None:
        producer = self.producer
        try:
            partitions = producer.client.cluster.partitions_for_topic(self.topic)
            if partitions is None:  # metadata not loaded yet (or the topic is being created)
                partitions = await producer.partitions_for(self.topic)
        except (KafkaError, OSError) as exc:
            _fail_all([w for *_, w in queued], exc)
            return
        # Each shipment goes whole to the next partition in turn (Kafka's sticky
        # partitioner does the same for unkeyed records): one batch per shipment, and one
        # hot sale's events spread evenly over every partition.
        ordered = sorted(partitions)
        batch = producer.create_batch()
        waiters: list[asyncio.Future[None]] = []
        for key, value, waiter in queued:
            if batch.append(key=key, value=value, timestamp=None) is None:  # batch full
                await self._ship(batch, self._next_partition(ordered), waiters)
                batch, waiters = producer.create_batch(), []
                batch.append(key=key, value=value, timestamp=None)
            waiters.append(waiter)
        await self._ship(batch, self._next_partition(ordered), waiters)

    def _next_partition(self, ordered: list[int]) -> int:
        self._turn += 1
        return ordered[self._turn % len(ordered)]

    async def _ship(self, batch: Any, partition: int, waiters: list[asyncio.Future[None]]) -> None:
        try:
            ack = await self.producer.send_batch(batch, self.topic, partition=partition)
        except (KafkaError, OSError) as exc:
            _fail_all(waiters, exc)
            return

        def _done(fut: asyncio.Future[Any]) -> None:
            exc = None if fut.cancelled() else fut.exception()
            for waiter in waiters:
                if waiter.done():
                    continue
                if exc is not None:
                    waiter.set_exception(exc)
                elif fut.cancelled():
                    waiter.set_exception(KafkaError("batch cancelled"))
                else:
                    waiter.set_result(None)

        ack.add_done_callback(_done)

    async def publish_many(
        self,
        items: Sequence[tuple[bytes, bytes] | tuple[bytes, bytes, list[tuple[str, bytes]]]],
        *,
        topic: str | None = None,
    ) -> None:
        """Send a batch and await every ack (the sweeper and the dead-letter path)."""
        try:
            async with asyncio.timeout(self._timeout_s * 2):
                futures = []
                for item in items:
                    headers = item[2] if len(item) == 3 else None
                    futures.append(
                        await self.producer.send(
                            topic or self.topic, item[1], key=item[0], headers=headers
                        )
                    )
                await asyncio.gather(*futures)
        except (TimeoutError, KafkaError) as exc:
            raise PublishFailed(f"{type(exc).__name__}: {exc}") from exc

    async def ping(self, timeout_s: float = 2.0) -> bool:
        """True if the broker answers a metadata request."""
        try:
            async with asyncio.timeout(timeout_s):
                client: Any = self.producer.client
                await client.fetch_all_metadata()
        except (TimeoutError, KafkaError, OSError):
            return False
        return True
