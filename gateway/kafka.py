"""Kafka: topic set-up and the order-event producer.

The producer awaits the broker's ack (``acks=all``) for every accepted order, but
many requests share one batch: each request ``send``s and awaits its own future
while aiokafka's sender packs concurrent sends together (``linger_ms``). Works the
same against Apache Kafka and tansu; idempotence is a setting because tansu does
not implement ``InitProducerId``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from gateway.settings import Settings

log = logging.getLogger(__name__)


class PublishFailed(Exception):
    """The broker did not acknowledge the event within the bound."""


async def ensure_topics(settings: Settings, *, timeout_s: float = 15.0) -> None:
    """Create the orders and dead-letter topics if they do not exist yet."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka, request_timeout_ms=5000)
    await asyncio.wait_for(admin.start(), timeout_s)
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(settings.kafka_orders_topic, settings.kafka_partitions, 1),
            NewTopic(settings.kafka_dlq_topic, 1, 1),
        ]
        missing = [t for t in wanted if t.name not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
            log.info("created topics %s", [t.name for t in missing])
    finally:
        await admin.close()


class OrderProducer:
    """Produces order events keyed by sale so that one sale's events stay ordered."""

    def __init__(self, settings: Settings, *, topic: str | None = None) -> None:
        self._settings = settings
        self.topic = topic or settings.kafka_orders_topic
        self._timeout_s = settings.kafka_produce_timeout_ms / 1000
        self._producer: AIOKafkaProducer | None = None

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

    async def stop(self) -> None:
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

    async def publish(
        self,
        key: bytes,
        value: bytes,
        *,
        topic: str | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        """Send and await the broker's ack; raise PublishFailed after the bound."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        try:
            async with asyncio.timeout_at(deadline):  # send() may wait for metadata or buffer
                fut = await self.producer.send(topic or self.topic, value, key=key, headers=headers)
            if not fut.done():
                # Wait for the ack without cancelling it on timeout (the event may still land;
                # the consumer's claim then decides) and without a Timeout object per request.
                waiter: asyncio.Future[None] = loop.create_future()

                def _acked(_: object) -> None:
                    if not waiter.done():
                        waiter.set_result(None)

                def _expired() -> None:
                    if not waiter.done():
                        waiter.set_exception(TimeoutError())

                fut.add_done_callback(_acked)
                timer = loop.call_at(deadline, _expired)
                try:
                    await waiter
                finally:
                    timer.cancel()
            fut.result()
        except (TimeoutError, KafkaError) as exc:
            raise PublishFailed(f"{type(exc).__name__}: {exc}") from exc

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
