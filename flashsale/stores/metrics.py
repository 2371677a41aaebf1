"""Prometheus metrics.

With several gateway workers sharing a port, a scrape reaches one of them; so when
``PROMETHEUS_MULTIPROC_DIR`` is set (the supervisor sets it) every process writes
its samples there and ``/metrics`` aggregates them all.
"""

from __future__ import annotations

import bisect
import functools
import os
from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BOUNDS_S = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


class Metrics:
    """Every metric the gateway and consumers export, created once per process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry
        reg = REGISTRY if registry is None else registry
        counter = functools.partial(Counter, registry=reg)
        gauge = functools.partial(Gauge, registry=reg)
        histogram = functools.partial(Histogram, registry=reg)
        self.requests = counter(
            "flashsale_http_requests_total", "HTTP requests", ["method", "route", "status"]
        )
        self.latency = histogram(
            "flashsale_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=LATENCY_BOUNDS_S,
        )
        self.errors = counter("flashsale_errors_total", "Client-visible errors by code", ["code"])
        self.redis_calls = counter(
            "flashsale_redis_round_trips_total", "Redis round trips by purpose", ["purpose"]
        )
        self.produce_failures = counter(
            "flashsale_kafka_produce_failures_total", "Order events the broker did not ack"
        )
        self.consumed = counter(
            "flashsale_consumer_orders_persisted_total", "Orders persisted by consumers"
        )
        self.oversold = counter(
            "flashsale_consumer_orders_oversold_total",
            "Accepted flash orders beyond the sale's allotment, kept as status 'oversold' "
            "(never payable); each one is a broken promise to look at",
        )
        self.dead_letters = counter(
            "flashsale_consumer_dead_letters_total",
            "Messages sent to the dead-letter topic",
            ["reason"],
        )
        self.consumer_lag = gauge(
            "flashsale_consumer_lag",
            "Messages behind the high-water mark",
            ["partition"],
            multiprocess_mode="max",
        )
        self.swept = counter("flashsale_sweeper_actions_total", "Sweeper actions", ["action"])
        self.drift = gauge(
            "flashsale_reconcile_drift_units",
            "Units of drift found by the last reconcile",
            ["sale_id"],
            multiprocess_mode="max",
        )
        self.payments_refunded = counter(
            "flashsale_payments_auto_refunded_total",
            "Verified payments given back at once because their order could not take them "
            "(cancelled, expired, or paid by another payment), by the order's state",
            ["order_status"],
        )
        self.money_drift = gauge(
            "flashsale_reconcile_money_drift",
            "Findings of the last reconcile's money checks, by check (0: money adds up)",
            ["check"],
            multiprocess_mode="max",
        )

        self.plan_on = gauge(
            "flashsale_plan_on",
            "1 while a contingency plan is switched on (flashsale/plans.py), per plan",
            ["plan"],
            multiprocess_mode="livemax",
        )
        self.store_up = gauge(
            "flashsale_store_up",
            "1 while this worker's last probe of a store (postgres, redis, kafka) answered",
            ["store"],
            multiprocess_mode="livemin",
        )
        self.queue_length = gauge(
            "flashsale_queue_length",
            "Shoppers waiting in a queued sale's waiting room (entered, not yet admitted)",
            ["sale_id"],
            multiprocess_mode="livemax",
        )
        self.queue_entered = counter(
            "flashsale_queue_entered_total", "Shoppers who entered a waiting room"
        )
        self.queue_admitted = counter("flashsale_queue_admitted_total", "Shoppers admitted to join")
        self.queue_joined = counter(
            "flashsale_queue_joined_total", "Admitted shoppers whose join was accepted"
        )
        self.queue_abandoned = counter(
            "flashsale_queue_abandoned_total", "Admissions whose join window passed without a join"
        )
        self.queue_rejected = counter(
            "flashsale_queue_rejected_total", "Entries refused, by reason", ["reason"]
        )
        self.queue_wait = histogram(
            "flashsale_queue_wait_seconds",
            "Time from entering the waiting room to admission",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600),
        )
        # Set once a second per worker from its in-memory sale cache (gateway/routes/
        # dashboard.py), never on the join path; Prometheus and Grafana chart them.
        self.sale_remaining = gauge(
            "flashsale_sale_remaining_units",
            "Units left in a flash sale (the gateway's copy of the Redis counter)",
            ["sale_id"],
            multiprocess_mode="livemostrecent",
        )
        self.sale_allotment = gauge(
            "flashsale_sale_allotment_units",
            "Units ever moved into a flash sale",
            ["sale_id"],
            multiprocess_mode="livemostrecent",
        )

    def declare(
        self,
        *,
        error_codes: Iterable[str] = (),
        routes: Iterable[tuple[str, str, str]] = (),
        sweeper_actions: Iterable[str] = (),
        dead_letter_reasons: Iterable[str] = (),
    ) -> None:
        """Create these label values at zero, so that a dashboard plots 0 from the start
        instead of "no data" until the first event of each kind."""
        for code in error_codes:
            self.errors.labels(code)
        for method, route, status in routes:
            self.requests.labels(method, route, status)
            self.latency.labels(method, route)
        for action in sweeper_actions:
            self.swept.labels(action)
        for reason in dead_letter_reasons:
            self.dead_letters.labels(reason)

    def render(self) -> tuple[bytes, str]:
        """The exposition text of every process (multiprocess) or of this one."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry), CONTENT_TYPE_LATEST
        if self.registry is not None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        return generate_latest(), CONTENT_TYPE_LATEST


_METRICS: Metrics | None = None


def get_metrics() -> Metrics:
    """The process-wide metrics (prometheus_client registers names globally)."""
    global _METRICS
    if _METRICS is None:
        _METRICS = Metrics()
    return _METRICS


class RequestStats:
    """Per-request figures gathered in plain dicts and handed to Prometheus once a second.

    Calling prometheus_client on every request costs a lock, a label lookup and, with
    several workers, writes into memory-mapped files; on the hot path that is a tenth
    of a request's CPU. Here a request costs two dict updates; ``flush`` (every second,
    and before each scrape) adds the totals to the same metrics.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._bounds = [*LATENCY_BOUNDS_S, float("inf")]
        self._counts: dict[tuple[str, str, int], int] = {}
        self._latency: dict[tuple[str, str], list[float]] = {}
        self._errors: dict[str, int] = {}

    def error(self, code: str) -> None:
        self._errors[code] = self._errors.get(code, 0) + 1

    def record(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        self._counts[key] = self._counts.get(key, 0) + 1
        lat = self._latency.get((method, route))
        if lat is None:
            lat = self._latency[(method, route)] = [0.0] * (len(self._bounds) + 1)
        lat[bisect.bisect_left(self._bounds, seconds)] += 1
        lat[-1] += seconds

    def flush(self) -> None:
        counts, self._counts = self._counts, {}
        latency, self._latency = self._latency, {}
        errors, self._errors = self._errors, {}
        for code, n in errors.items():
            self._metrics.errors.labels(code).inc(n)
        for (method, route, status), n in counts.items():
            self._metrics.requests.labels(method, route, str(status)).inc(n)
        for (method, route), lat in latency.items():
            child: Any = self._metrics.latency.labels(method, route)
            # prometheus_client keeps one value per bin, its "bucket" (made cumulative on collect)
            for i, bin_count in enumerate(lat[:-1]):
                if bin_count:
                    child._buckets[i].inc(int(bin_count))
            child._sum.inc(lat[-1])
