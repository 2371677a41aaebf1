"""Every Redis key name, built in one place.

All keys of one sale share the hash tag ``{sale:<id>}`` so that every key a script
touches lives in one Redis Cluster slot. A sale created with N > 1 buckets keeps N such
sets of keys: bucket 0 under ``{sale:<id>}``, beside the keys of the whole sale (a sale of
one bucket is then in one slot), bucket k under ``{sale:<id>:b<k>}``, each on a slot of its
own, so one hot sale spreads over the shards (``flashsale/flash/buckets.py``).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from typing import Protocol

SALES_INDEX = "fs:sales"  # set of sale ids the gateway workers keep in memory


def _tag(sale_id: int, bucket: int = 0) -> str:
    if bucket:
        return f"fs:{{sale:{sale_id}:b{bucket}}}"
    return f"fs:{{sale:{sale_id}}}"


class BucketKey(Protocol):
    """A key of one bucket of a sale (bucket 0: the sale of one bucket)."""

    def __call__(self, sale_id: int, bucket: int = 0) -> str: ...


def _bucket_key(suffix: str) -> BucketKey:
    def key(sale_id: int, bucket: int = 0) -> str:
        return _tag(sale_id, bucket) + suffix

    return key


def _sale_key(suffix: str) -> Callable[[int], str]:
    """A key of the whole sale: it lives beside bucket 0."""

    def key(sale_id: int) -> str:
        return _tag(sale_id) + suffix

    return key


# --- each bucket's keys (all of them in every bucket of a split sale) ---

# Hash: remaining, allotment, moved_out, limit, start_ms, end_ms, price, closed, …
sale = _bucket_key("")
# Hash: user id → units held by that user in this sale.
users = _bucket_key(":users")
# Hash: user id → the user's first order id in this sale.
first_order = _bucket_key(":first")
# Hash: order id → packed reservation, for reservations not yet claimed by a consumer.
log = _bucket_key(":log")
# Sorted set: order id scored by the time it was reserved or last republished (ms).
log_times = _bucket_key(":logt")
# Hash: order id → packed reservation, claimed by a consumer and being persisted.
claimed = _bucket_key(":claimed")
# Sorted set: claimed order id scored by when it was claimed, or when the sweeper next looks
# at it after republishing it (ms).
claim_times = _bucket_key(":claimt")
# Hash: order id → how many times the sweeper republished it (its backoff step).
republished = _bucket_key(":tries")
# Set: order ids released before any consumer claimed them (never to be persisted).
voided = _bucket_key(":void")
# Set: cancelled order ids whose units are already back (makes the return idempotent).
returned = _bucket_key(":returned")
# Hash: "<user>:<Idempotency-Key>" → "<order id>|<body fingerprint>".
idempotency = _bucket_key(":idem")
# Hash: transfer id → "<to bucket>|<units>|<at ms>": units this bucket gave another
# (``lua/bucket_give.lua``) until the sweeper or the giver sees them credited there.
transfers_out = _bucket_key(":xout")
# Set: ids of the transfers credited to this bucket (makes the credit idempotent).
transfers_in = _bucket_key(":xin")


def rate_user(sale_id: int, user_id: int | str, bucket: int = 0) -> str:
    return f"{_tag(sale_id, bucket)}:rl:u:{user_id}"


def rate_ip(sale_id: int, ip: str, bucket: int = 0) -> str:
    return f"{_tag(sale_id, bucket)}:rl:ip:{ip}"


# --- the whole sale's keys ---

# String: the one recovery process recounting a bucketed sale holds it (its token).
rearm_lease = _sale_key(":rearm")
# String: the dashboard's latest one-second snapshot of the sale (JSON).
dash_snapshot = _sale_key(":dash")
# List: the dashboard's last minutes of snapshots (JSON), oldest first.
dash_history = _sale_key(":dash:hist")
# String: units of drift the last reconcile found in the sale (for the dashboard).
dash_drift = _sale_key(":dash:drift")
# String: how many money findings the last reconcile made on the sale's orders.
dash_money_drift = _sale_key(":dash:money_drift")


def dash_tick(sale_id: int, second: int) -> str:
    """String set NX by the one process that computes this second's snapshot."""
    return f"{_tag(sale_id)}:dash:tick:{second}"


# The dashboard's figures from every process of every host, in one Cluster slot ({dash}).
DASH_TOTALS = "fs:{dash}:totals"  # hash: counter name → total over every process, ever


def dash_second(second: int) -> str:
    """Hash: what every process published during one epoch second (counter deltas by
    HINCRBY; gauges by HSET under ``name|process``); expires after a minute or so."""
    return f"fs:{{dash}}:s:{second}"


# --- keys of no sale ---

# Token generations (flashsale/sessions.py), under one hash tag: its transactions touch the
# three together. Hash: user id → generation; the counter bumped with every write to it;
# the mark that the hash was seeded from PostgreSQL (gone: Redis lost it).
AUTH_GENERATIONS = "fs:{auth}:gen"
AUTH_GENERATIONS_VERSION = "fs:{auth}:gen:version"
AUTH_GENERATIONS_SEEDED = "fs:{auth}:gen:seeded"
AUTH_REVOKED = "fs:auth:revoked"  # pub/sub channel: "<user id>:<generation>"

# The contingency plans (flashsale/plans.py), under one hash tag: lua/plan_switch.lua
# writes the three at once. Hash: plan → JSON state; the counter bumped with every change;
# the stream of the plans' operation log.
PLANS_STATE = "fs:{plans}:state"
PLANS_VERSION = "fs:{plans}:version"
PLANS_LOG = "fs:{plans}:log"
PLANS_CHANGED = "fs:plans:changed"  # pub/sub channel: the new version


def catalog_copy(page: str) -> str:
    """String: one catalog page's last good answer (``page``: its path and query)."""
    return "fs:catalog:copy:" + page


def machine(n: int) -> str:
    """String: the lease on machine id ``n`` (lua/machine_lease.lua)."""
    return f"fs:machine:{n}"


def drained(topic: str) -> str:
    """Hash: partition → the time (ms) up to which the consumer group has read that partition
    of ``topic`` (written by the consumers, read by the stranded sweeper)."""
    return "fs:drained:" + topic


def _account(login: str) -> str:
    # hashed: the key names no address; unknown accounts are counted the same way
    return hashlib.sha256(login.encode()).hexdigest()[:32]


def login_account(login: str) -> str:
    """Counter: failed logins at one account, from every address."""
    return "fs:login:acct:" + _account(login)


def login_ip(client_ip: str) -> str:
    """Counter: logins from one address. One hash tag per address: its own count and its
    counts per account change in one transaction."""
    return "fs:{login-ip:" + client_ip + "}"


def login_account_ip(login: str, client_ip: str) -> str:
    """Counter: logins at one account from one address."""
    return login_ip(client_ip) + ":acct:" + _account(login)


def register_ip(client_ip: str) -> str:
    """Counter: registrations from one address."""
    return "fs:register:ip:" + client_ip


def all_sale_keys(sale_id: int, bucket: int = 0) -> list[str]:
    return [
        sale(sale_id, bucket),
        users(sale_id, bucket),
        first_order(sale_id, bucket),
        log(sale_id, bucket),
        log_times(sale_id, bucket),
        claimed(sale_id, bucket),
        claim_times(sale_id, bucket),
        republished(sale_id, bucket),
        voided(sale_id, bucket),
        returned(sale_id, bucket),
        idempotency(sale_id, bucket),
        transfers_out(sale_id, bucket),
        transfers_in(sale_id, bucket),
    ]


# --- a queued sale's waiting room ---

# Hash: drawn, lottery (its size once drawn), arrived (entrants after the draw), entered,
# admitted (the last position admitted), joined, abandoned.
queue = _sale_key(":q")
# Sorted set: user id scored by its random draw (entrants before the start).
queue_lottery = _sale_key(":q:lot")
# List: user ids that entered after the draw, in arrival order.
queue_arrivals = _sale_key(":q:arr")
# Hash: user id → "<L|F>|<position, 0 for the lottery>|<entered at ms>".
queue_entrants = _sale_key(":q:who")
# Sorted set: admitted user ids that have not joined yet, scored by window end (ms).
queue_outstanding = _sale_key(":q:out")
# List of "<last position admitted>|<at ms>", one per admission step.
queue_admissions = _sale_key(":q:adm")
# The admitter lease of a queued sale (lua/machine_lease.lua).
queue_lease = _sale_key(":q:lease")


# The counts of the entry limits (lua/queue_enter.lua's KEYS[6] to [10], in its order):
# attempts per account, entrants per client IP, entrants per device id, each account's
# device id, the device ids each client IP brought.
_QUEUE_LIMITS = (":q:att", ":q:ip", ":q:dev", ":q:acdev", ":q:ipdev")


def _queue_keys(sale_id: int) -> list[str]:
    """The keys both waiting-room scripts start with."""
    return [
        sale(sale_id),
        queue(sale_id),
        queue_lottery(sale_id),
        queue_arrivals(sale_id),
        queue_entrants(sale_id),
    ]


def queue_enter_keys(sale_id: int) -> list[str]:
    """lua/queue_enter.lua"""
    return [*_queue_keys(sale_id), *(_tag(sale_id) + limit for limit in _QUEUE_LIMITS)]


def queue_admit_keys(sale_id: int) -> list[str]:
    """lua/queue_admit.lua"""
    return [
        *_queue_keys(sale_id),
        queue_outstanding(sale_id),
        queue_admissions(sale_id),
        users(sale_id),
    ]


def _of(sale_id: int, bucket: int, *builders: Callable[[int, int], str]) -> list[str]:
    """The keys ``builders`` name for one bucket, in order (a script's KEYS)."""
    return [build(sale_id, bucket) for build in builders]


# KEYS of each script, in the order the script's header lists them; ``bucket`` is the
# shopper's home bucket (0 for a sale of one bucket).
def reserve_keys(sale_id: int, user_id: int | str, client_ip: str, bucket: int = 0) -> list[str]:
    """lua/reserve.lua"""
    return [
        *_bucket_keys(sale_id, bucket),
        rate_user(sale_id, user_id, bucket),
        rate_ip(sale_id, client_ip, bucket),
    ]


@functools.lru_cache(maxsize=4096)
def _bucket_keys(sale_id: int, bucket: int) -> tuple[str, ...]:
    """The keys of reserve.lua that name only the sale's bucket: built once per bucket,
    not per join (the eight keys took 2.4 µs a join, 0.55 µs with these six cached; timeit)."""
    return (
        sale(sale_id, bucket),
        users(sale_id, bucket),
        first_order(sale_id, bucket),
        log(sale_id, bucket),
        log_times(sale_id, bucket),
        idempotency(sale_id, bucket),
    )


def release_keys(sale_id: int, bucket: int = 0) -> list[str]:
    """lua/release.lua"""
    return _of(
        sale_id, bucket, sale, users, first_order, log, log_times, voided, idempotency, claimed
    )


def claim_keys(sale_id: int, bucket: int = 0) -> list[str]:
    """lua/claim.lua"""
    return _of(sale_id, bucket, log, log_times, claimed, voided, claim_times)


def rearm_keys(sale_id: int, bucket: int = 0) -> list[str]:
    """lua/sale_rearm.lua"""
    return _of(
        sale_id,
        bucket,
        sale,
        users,
        first_order,
        log,
        log_times,
        claimed,
        returned,
        transfers_out,
        transfers_in,
    )


def return_units_keys(sale_id: int, bucket: int = 0) -> list[str]:
    """lua/return_units.lua"""
    return [sale(sale_id, bucket), users(sale_id, bucket), returned(sale_id, bucket)]


def give_keys(sale_id: int, bucket: int) -> list[str]:
    """lua/bucket_give.lua (on the giving bucket)"""
    return [sale(sale_id, bucket), transfers_out(sale_id, bucket)]


def take_keys(sale_id: int, bucket: int) -> list[str]:
    """lua/bucket_take.lua (on the receiving bucket)"""
    return [sale(sale_id, bucket), transfers_in(sale_id, bucket)]
