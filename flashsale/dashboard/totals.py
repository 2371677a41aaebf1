"""What the dashboard counts, read out of Prometheus samples and written as Redis hash fields.

``Totals`` holds the counters and gauges of one process, of one second or of every process
summed; ``read_metrics`` picks them out of collected metric families, ``counter_fields`` and
``gauge_fields`` turn them into the fields a second's hash holds, ``add_counters`` and
``add_gauges`` sum such fields back. Which requests are joins is the HTTP layer's to say: it
hands over the route templates of its join routes.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client.metrics_core import Metric

from flashsale import errors

# The join refusals the dashboard names, by error code (flashsale.errors); NOT_ADMITTED and
# ADMISSION_EXPIRED are a queued sale's (no admission, or one whose window passed).
REFUSAL_CODES: Final = tuple(
    refusal.code
    for refusal in (
        errors.SoldOut,
        errors.LimitExceeded,
        errors.InsufficientStock,
        errors.RateLimited,
        errors.NotAdmitted,
        errors.AdmissionExpired,
        errors.NotStarted,
        errors.SaleEnded,
        errors.ServiceUnavailable,
        errors.SaleRecovering,
    )
)
# The waiting room's series (flashsale/stores/metrics.py): a queued sale's length, admissions.
QUEUE_LENGTH: Final = "flashsale_queue_length"
QUEUE_ADMITTED: Final = "flashsale_queue_admitted_total"


@dataclass(slots=True)
class Totals:
    """The counters a snapshot needs, summed over every process."""

    join_by_status: dict[str, float] = field(default_factory=dict)
    refusals: dict[str, float] = field(default_factory=dict)
    join_bins: dict[float, float] = field(default_factory=dict)  # le → cumulative count
    persisted: float = 0.0
    dead_letters: float = 0.0
    lag: float = 0.0
    # the waiting room's (built separately): present once its metrics are exported
    queue_length: dict[str, float] = field(default_factory=dict)  # sale id → shoppers
    queue_admitted: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "join_by_status": self.join_by_status,
            "refusals": self.refusals,
            # le as text: JSON has no infinity ("+Inf" reads back with float())
            "join_bins": [[repr(le), n] for le, n in sorted(self.join_bins.items())],
            "persisted": self.persisted,
            "dead_letters": self.dead_letters,
            "queue_admitted": self.queue_admitted,
        }


def read_metrics(families: Iterable[Metric], join_routes: Collection[str]) -> Totals:
    """Pick the dashboard's figures out of collected metric families; requests to
    ``join_routes`` (route templates, as the request metrics label them) are the joins."""
    t = Totals()
    for fam in families:
        for s in fam.samples:
            labels = s.labels
            if s.name == "flashsale_http_requests_total":
                if labels.get("route") in join_routes and labels.get("method") == "POST":
                    st = labels.get("status", "")
                    t.join_by_status[st] = t.join_by_status.get(st, 0.0) + s.value
            # (Prometheus calls a histogram's cumulative bins its ``_bucket`` samples)
            elif s.name == "flashsale_http_request_duration_seconds_bucket":
                if labels.get("route") in join_routes and labels.get("method") == "POST":
                    le = float(labels["le"])
                    t.join_bins[le] = t.join_bins.get(le, 0.0) + s.value
            elif s.name == "flashsale_errors_total":
                code = labels.get("code", "")
                if code in REFUSAL_CODES:
                    t.refusals[code] = t.refusals.get(code, 0.0) + s.value
            elif s.name == "flashsale_consumer_orders_persisted_total":
                t.persisted += s.value
            elif s.name == "flashsale_consumer_dead_letters_total":
                t.dead_letters += s.value
            elif s.name == "flashsale_consumer_lag":
                t.lag += s.value
            elif s.name == QUEUE_LENGTH:
                sid = labels.get("sale_id", "")
                t.queue_length[sid] = t.queue_length.get(sid, 0.0) + s.value
            elif s.name == QUEUE_ADMITTED:
                t.queue_admitted = (t.queue_admitted or 0.0) + s.value
    return t


# Counter fields of a second and of the totals: a fixed, small set whatever the traffic.
_REQ, _REF, LATENCY_FIELD = "req:", "ref:", "lat:"
_PERSISTED, _DEAD, _ADMITTED = "persisted", "dead_letters", "queue_admitted"
# Gauge fields, ``<name>|<process>`` (a sale's: ``<name>:<sale id>|<process>``).
_LAG, _QLEN = "lag", "queue_length:"


def counter_fields(t: Totals) -> dict[str, float]:
    out: dict[str, float] = {_PERSISTED: t.persisted, _DEAD: t.dead_letters}
    out.update({_REQ + st: n for st, n in t.join_by_status.items()})
    out.update({_REF + code: n for code, n in t.refusals.items()})
    out.update({LATENCY_FIELD + repr(le): n for le, n in t.join_bins.items()})
    if t.queue_admitted is not None:
        out[_ADMITTED] = t.queue_admitted
    return out


def gauge_fields(t: Totals, process: str) -> dict[str, float]:
    out = {f"{_LAG}|{process}": t.lag}
    out.update({f"{_QLEN}{sid}|{process}": n for sid, n in t.queue_length.items()})
    return out


def add_counters(t: Totals, fields: dict[str, float]) -> None:
    for name, n in fields.items():
        if name.startswith(_REQ):
            st = name[len(_REQ) :]
            t.join_by_status[st] = t.join_by_status.get(st, 0.0) + n
        elif name.startswith(_REF):
            code = name[len(_REF) :]
            t.refusals[code] = t.refusals.get(code, 0.0) + n
        elif name.startswith(LATENCY_FIELD):
            le = float(name[len(LATENCY_FIELD) :])
            t.join_bins[le] = t.join_bins.get(le, 0.0) + n
        elif name == _PERSISTED:
            t.persisted += n
        elif name == _DEAD:
            t.dead_letters += n
        elif name == _ADMITTED:
            t.queue_admitted = (t.queue_admitted or 0.0) + n


def add_gauges(t: Totals, latest: dict[str, float]) -> None:
    """Each process's latest gauge values: lag summed (each consumer's own partitions),
    a sale's queue length the largest any process reports."""
    for name, n in latest.items():
        base = name.partition("|")[0]
        if base == _LAG:
            t.lag += n
        elif base.startswith(_QLEN):
            sid = base[len(_QLEN) :]
            t.queue_length[sid] = max(t.queue_length.get(sid, 0.0), n)


def decode_fields(raw: dict[bytes, bytes]) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in raw.items()}
