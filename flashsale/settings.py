"""Settings from ``FLASHSALE_*`` environment variables: one frozen dataclass.

Each setting is declared once, as a field of :class:`Settings` whose metadata says how its
variable is read (type, range or choices) and what it means; :meth:`Settings.from_env` walks
the fields, and the table in docs/settings.md is :func:`settings_table` (``python -m
flashsale.settings`` prints it; a test holds the two together). A malformed value, or a
missing one that the chosen command needs, raises :class:`SettingsError` whose message is one
line naming the variable; the CLI prints it and exits 2.
"""

from __future__ import annotations

import difflib
import hashlib
import hmac
import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final, TypeVar

PREFIX = "FLASHSALE_"
# "none": no provider takes payments (notifications are still verified and applied);
# "sandbox": the built-in stand-in that pays orders with no money (demo and tests only).
PAYMENT_PROVIDERS = ("none", "sandbox")
# aiokafka's partition assignors (it has no cooperative-sticky, see flashsale/stores/kafka.py)
KAFKA_ASSIGNORS = ("sticky", "roundrobin", "range")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# HKDF "info" of the notify key derived from the secret key when no PAYMENT_SECRET is set:
# a provider given that key learns nothing about the token signing key.
PAYMENT_NOTIFY_KEY_LABEL = b"flashsale/payment-notify-hmac/v1"
# HS256 wants a key at least as long as its 32-byte output (RFC 7518 §3.2).
MIN_SECRET_CHARS = 32
DAY_S = 24 * 3600

_T = TypeVar("_T")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def hkdf_sha256(ikm: bytes, info: bytes, salt: bytes = b"") -> bytes:
    """A 32-byte key from HKDF-SHA256 (RFC 5869): extract, then one expand block."""
    prk = hmac.new(salt or bytes(hashlib.sha256().digest_size), ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


class SettingsError(Exception):
    """A setting is missing or malformed."""


# How a variable's text becomes a value: (variable name, its text stripped) -> value or
# SettingsError naming the variable.
Parse = Callable[[str, str], Any]


@dataclass(frozen=True, slots=True)
class Spec:
    """How a setting is read and what the docs say of it."""

    parse: Parse
    doc: str
    shown: str | None  # the default as docs/settings.md shows it, when not the value itself
    lo: float | None = None  # a number's range (what a sale's own value may be too)
    hi: float | None = None


def _setting(
    default: _T,
    parse: Parse,
    doc: str,
    shown: str | None = None,
    lo: float | None = None,
    hi: float | None = None,
) -> _T:
    return field(default=default, metadata={"spec": Spec(parse, doc, shown, lo, hi)})


_N = TypeVar("_N", int, float)


def _in_range(name: str, raw: str, kind: type[_N], lo: _N, hi: _N) -> _N:
    try:
        value = kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise SettingsError(f"{name}={raw!r} is not {what}") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{name}={value} is out of range [{lo}, {hi}]")
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _to_bool(name: str, raw: str) -> bool:
    low = raw.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean (use true/false)")


def _text(name: str, raw: str) -> str:
    return raw


def _integer(default: int, lo: int, hi: int, doc: str, shown: str | None = None) -> int:
    parse: Parse = lambda name, raw: _in_range(name, raw, int, lo, hi)  # noqa: E731
    return _setting(default, parse, doc, shown, lo, hi)


def _number(default: float, lo: float, hi: float, doc: str) -> float:
    parse: Parse = lambda name, raw: _in_range(name, raw, float, lo, hi)  # noqa: E731
    return _setting(default, parse, doc, None, lo, hi)


def _flag(default: bool, doc: str) -> bool:
    return _setting(default, _to_bool, doc)


def _string(default: str, doc: str) -> str:
    return _setting(default, _text, doc)


def _secret(doc: str, shown: str) -> str | None:
    return _setting(None, _text, doc, shown)


def _choice(default: str, choices: tuple[str, ...], doc: str) -> str:
    upper = all(c == c.upper() for c in choices)

    def parse(name: str, raw: str) -> str:
        value = raw.upper() if upper else raw.lower()
        if value not in choices:
            raise SettingsError(f"{name}={value!r} must be one of: " + ", ".join(choices))
        return value

    return _setting(default, parse, doc)


def _secret_key(name: str, raw: str) -> str:
    if len(raw) < MIN_SECRET_CHARS:
        raise SettingsError(f"{name} must be at least {MIN_SECRET_CHARS} characters")
    return raw


def _redis_url(name: str, raw: str) -> str:
    # The join path's lean connection (flashsale/stores/redisbatch.py) speaks plain TCP only: a
    # TLS or unix-socket URL would pass here and then fail at start, so it is refused here.
    if not all(u.strip().startswith("redis://") for u in raw.split(",")):
        raise SettingsError(f"{name}: the join path supports redis:// only")
    return raw


def _postgres_url(name: str, raw: str) -> str:
    schemes = ("postgres://", "postgresql://")
    if not raw.startswith(schemes):
        raise SettingsError(f"{name}={raw!r} must start with one of: " + ", ".join(schemes))
    return raw


def _bootstrap(name: str, raw: str) -> str:
    for part in raw.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise SettingsError(f"{name}={raw!r} must be host:port[,host:port...]")
    return raw


def _networks(name: str, raw: str) -> tuple[Network, ...]:
    nets = []
    for part in raw.split(","):
        try:
            nets.append(ipaddress.ip_network(part.strip(), strict=False))
        except ValueError:
            raise SettingsError(f"{name}: {part.strip()!r} is not an IP or CIDR") from None
    return tuple(nets)


EMBEDDED = "— (embedded in `up`)"


FILE_SUFFIX = "_FILE"


def _with_files(env: Mapping[str, str], names: set[str]) -> Mapping[str, str]:
    """``FLASHSALE_<NAME>_FILE=path`` sets a setting to a file's content (its last line
    break dropped): how a secret mounted by compose (``/run/secrets/...``) reaches a setting
    without standing in the environment or on a command line."""
    given = {
        key: path
        for key, path in env.items()
        if key.startswith(PREFIX)
        and key.endswith(FILE_SUFFIX)
        and key[len(PREFIX) : -len(FILE_SUFFIX)].lower() in names
    }
    if not given:
        return env
    out = dict(env)
    for key, path in given.items():
        name = key.removesuffix(FILE_SUFFIX)
        if env.get(name):
            raise SettingsError(f"{name} and {key} are both set; keep one")
        try:
            out[name] = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise SettingsError(f"{key}={path}: cannot read it ({exc.strerror})") from None
    return out


# verified tokens a worker remembers: a few hundred thousand shoppers at ~400 B each
TOKEN_CACHE_SIZE: Final = 250_000


@dataclass(frozen=True, slots=True)
class Settings:
    """Every tunable of the gateway, the consumers and the supervisor."""

    redis_url: str | None = _setting(
        None,
        _redis_url,
        "`redis://:password@host:port/db` (plain `redis://` only: the join path speaks no TLS"
        " and no unix socket, so `rediss://` and `unix://` are refused at start); with"
        " `FLASHSALE_REDIS_CLUSTER=true`, one or more seed nodes separated by commas: a process"
        " asks them for the slot map at start, so list several)",
        EMBEDDED,
    )
    redis_cluster: bool = _flag(
        False,
        "`true`: Redis is a Redis Cluster; every client routes by slot (the join path keeps one"
        " pipelined connection per primary, follows MOVED and refreshes its slot map after a"
        " failover)",
    )
    redis_wait_replicas: int = _integer(
        0,
        0,
        16,
        "after each pipelined batch of reservations, `WAIT` for this many replicas before any"
        " of the batch's joins is answered (one `WAIT` per batch); a batch not confirmed in"
        ' time answers "outcome unknown". Set it to 1 on a cluster with replicas, so that a'
        " failover never loses an accepted join",
    )
    redis_wait_timeout_ms: int = _integer(500, 1, 60_000, "how long that `WAIT` may take")
    database_url: str | None = _setting(
        None, _postgres_url, "`postgresql://user:password@host:port/db`", EMBEDDED
    )
    kafka_bootstrap: str | None = _setting(None, _bootstrap, "`host:port[,host:port]`", EMBEDDED)
    secret_key: str | None = _setting(
        None,
        _secret_key,
        f"token signing key, ≥ {MIN_SECRET_CHARS} characters",
        "— (`up` creates `.flashsale/secret_key`)",
    )

    http_host: str = _string("127.0.0.1", "listen address")
    http_port: int = _integer(8080, 0, 65535, "listen port")
    workers: int = _integer(2, 1, 256, "gateway processes sharing the port")
    max_body_bytes: int = _integer(1 << 20, 1024, 1 << 30, "larger bodies get 413")
    access_log: bool = _flag(True, "one JSON line per request (turn off for benchmarks)")
    join_fast_path: bool = _flag(
        True,
        "the join route and the waiting room's poll answered on the connection below"
        " aiohttp's request machinery (`gateway/fastjoin.py`; same answers, a fraction of the"
        " CPU); `false` serves them through aiohttp like every other route",
    )
    log_level: str = _choice("INFO", LOG_LEVELS, ", ".join(LOG_LEVELS))
    trusted_proxies: tuple[Network, ...] = _setting(
        (), _networks, "IPs/CIDRs whose `X-Forwarded-For` is believed", "empty"
    )
    data_dir: str = _string(
        ".flashsale", "embedded servers' data, secret, metrics files, consumer heartbeat"
    )
    machine_id: int | None = _setting(
        None,
        lambda name, raw: _in_range(name, raw, int, 0, 999),
        "0–999, part of every order id; by default each process leases a free one",
        "leased from Redis",
    )
    token_ttl_s: int = _integer(DAY_S, 1, 365 * DAY_S, "token lifetime")
    token_cache_size: int = _integer(
        TOKEN_CACHE_SIZE,
        1_000,
        10_000_000,
        "verified tokens each worker remembers (~400 B each: 100 MB at the default); size it"
        " to a sale's crowd, since a crowd larger than it pays the full check (~5 µs) on"
        " every request once it cycles",
    )

    # Throttles of login and registration, and the argon2 hash slots they share
    login_window_s: int = _integer(300, 1, DAY_S, "window of the login throttle")
    login_account_ip_attempts: int = _integer(
        10,
        1,
        1_000_000,
        "login attempts at one account from one client IP per window; a success resets it;"
        " then 429 + `Retry-After`",
    )
    login_account_attempts: int = _integer(
        1000,
        1,
        10_000_000,
        "login attempts at one account from all clients together per window: high, so that"
        " only a spray from many addresses meets it (an attacker elsewhere cannot lock the"
        " owner out); attempts an address's own limits refuse do not count",
    )
    login_ip_attempts: int = _integer(
        100, 1, 10_000_000, "login attempts per client IP (any account) per window"
    )
    login_hash_concurrency: int = _integer(
        2, 1, 256, "argon2 hashes (64 MiB each) running at once per worker"
    )
    login_hash_queue: int = _integer(
        32,
        0,
        100_000,
        "logins (and password changes) waiting for a hash slot per worker; past it 503"
        " `RETRY_LATER`",
    )
    register_window_s: int = _integer(3600, 1, 7 * DAY_S, "window of the registration throttle")
    register_ip_attempts: int = _integer(
        20, 1, 10_000_000, "registrations per client IP per window; then 429 + `Retry-After`"
    )
    register_hash_concurrency: int = _integer(
        1,
        1,
        256,
        "of the hash slots, how many registrations may hold at once (at most one less than"
        " all: logins keep the rest)",
    )
    register_hash_queue: int = _integer(
        8,
        0,
        100_000,
        "registrations waiting for a hash slot per worker (a queue of their own); past it 503"
        " `RETRY_LATER`",
    )

    # Event streams (gateway/streams.py): per address, per worker; lifetime
    stream_per_address: int = _integer(
        20,
        1,
        1_000_000,
        "event streams (sale page and dashboard) one client address may hold open on one"
        " worker; past it 429 + `Retry-After` (the sale page polls instead)",
    )
    stream_per_worker: int = _integer(
        1000,
        1,
        10_000_000,
        "event streams one worker holds open in all; past it 503 `RETRY_LATER` + `Retry-After`",
    )
    stream_max_s: int = _integer(
        1800,
        1,
        7 * DAY_S,
        "an event stream ends after this long (the pages reconnect by themselves)",
    )

    revocation_reload_ms: int = _integer(
        2000,
        50,
        60_000,
        "how often each worker re-checks its revocation map with Redis (safety net behind pub/sub)",
    )
    revocation_max_stale_s: int = _integer(
        15,
        1,
        3600,
        "a worker that could not reach Redis this long answers authenticated requests with"
        " 503 `AUTH_UNAVAILABLE` (fail-closed)",
    )

    # Contingency plans (flashsale/plans.py)
    plan_poll_ms: int = _integer(
        500,
        50,
        10_000,
        "how often each worker re-reads the contingency plans' states (safety net behind"
        " pub/sub; [docs/plans.md](plans.md))",
    )
    plan_arm_after_s: float = _number(
        3.0,
        0.0,
        3600.0,
        "an armed `catalog-from-cache` switches itself on after PostgreSQL has been out of"
        " reach this long",
    )
    plan_disarm_after_s: float = _number(
        10.0,
        0.0,
        3600.0,
        "…and back to armed after PostgreSQL has answered this long (the gap is the hysteresis)",
    )
    shed_cpu_percent: float = _number(
        0.0,
        0.0,
        100.0,
        "with `shed-storefront` on, a worker sheds storefront requests while its CPU over the"
        " last second (percent of one core) is at least this; 0: always",
    )

    db_pool_min: int = _integer(2, 0, 1000, "asyncpg pool per process: connections kept open")
    db_pool_max: int = _integer(10, 1, 1000, "asyncpg pool per process: connections at most")

    kafka_enable_idempotence: bool = _flag(
        False, "idempotent producer (true for Apache Kafka; tansu lacks `InitProducerId`)"
    )
    kafka_orders_topic: str = _string(
        "flashsale.orders",
        "order events, keyed by order id (one hot sale spreads over every partition)",
    )
    kafka_dlq_topic: str = _string(
        "flashsale.orders.dlq", "dead letters, with the reason in a header"
    )
    kafka_partitions: int = _integer(8, 1, 1024, "partitions of the orders topic when created")
    kafka_linger_ms: int = _integer(
        0,
        0,
        1000,
        "extra producer batching wait (0: batches still form while a request is in flight;"
        " 2 ms of linger only added latency here)",
    )
    kafka_produce_timeout_ms: int = _integer(
        5000,
        50,
        120_000,
        "ack bound; past it the reservation is released and the shopper gets 503",
    )
    kafka_session_timeout_ms: int = _integer(
        6000,
        1000,
        300_000,
        "consumer group session (short: tansu rebalances slowly otherwise)",
    )
    kafka_heartbeat_interval_ms: int = _integer(500, 100, 60_000, "consumer heartbeat")
    kafka_consumer_group: str = _string("flashsale-orders", "consumer group id")
    kafka_replication_factor: int = _integer(
        1,
        1,
        16,
        "replicas of the orders and dead-letter topics when created (3 in compose; tansu"
        " accepts and ignores it)",
    )
    kafka_min_insync_replicas: int = _integer(
        1,
        1,
        16,
        "`min.insync.replicas` of those topics (2 in compose: an acked order is on two"
        " brokers); at most the replication factor",
    )
    kafka_assignor: str = _choice(
        "sticky",
        KAFKA_ASSIGNORS,
        "consumer partition assignor: `sticky`, `roundrobin` or `range` (aiokafka has no"
        " cooperative-sticky; sticky keeps partitions where they were across a rebalance)",
    )
    consumer_batch_max: int = _integer(2000, 1, 100_000, "records per consumer batch / transaction")

    payment_window_s: int = _integer(900, 1, 7 * DAY_S, "default payment window of orders")
    max_per_user_default: int = _integer(
        20,
        1,
        1_000_000,
        "units of one SKU a user may hold in unpaid orders at once, for products whose"
        " `max_per_user` is unset",
    )
    presale_hold_s: int = _integer(
        1800,
        1,
        30 * DAY_S,
        "how long an unpaid presale order holds its units before the sweeper cancels it",
    )

    # Waiting room of queued sales (a sale's own queue settings override these).
    queue_admit_per_s: float = _number(
        50.0,
        0,
        1e6,
        "queued sales: shoppers admitted per second (a sale's `queue.admit_per_s` overrides"
        " it); `0` follows the measured accept rate (twice the units sold per second over the"
        " last 3 s, at least 20/s)",
    )
    queue_overbook: float = _number(
        1.2,
        1.0,
        10.0,
        "queued sales: admissions outstanding (admitted, not joined, window not over) never"
        " exceed remaining units × this",
    )
    queue_join_window_s: int = _integer(
        60, 5, 3600, "queued sales: how long an admission (its join token) lasts"
    )
    queue_opens_before_s: int = _integer(
        900,
        0,
        7 * DAY_S,
        "queued sales: the waiting room opens this long before the start",
    )
    queue_tick_ms: int = _integer(
        250,
        20,
        5000,
        "how often each gateway worker refreshes its copy of every queue (what polls read)"
        " and the admitter runs a step",
    )

    # Per-sale token buckets on join
    rate_user_per_s: float = _number(
        5.0, 0.001, 1e6, "per-user token bucket on join (per sale): refill per second"
    )
    rate_user_burst: int = _integer(10, 1, 1_000_000, "…and its size")
    rate_ip_per_s: float = _number(
        200.0, 0.001, 1e7, "per-client-IP token bucket on join (per sale): refill per second"
    )
    rate_ip_burst: int = _integer(400, 1, 10_000_000, "…and its size")

    # Sweepers (consumers/sweepers.py)
    stranded_after_s: int = _integer(
        5,
        1,
        3600,
        "age after which a reservation no consumer has claimed is republished, once the "
        "consumers have read every partition past it (plus "
        "`FLASHSALE_KAFKA_PRODUCE_TIMEOUT_MS`): an event waiting in the topic is not sent twice",
    )
    claim_stale_s: int = _integer(
        30,
        1,
        86_400,
        "age after which a consumer's claim not yet in PostgreSQL is republished",
    )
    republish_max_backoff_s: int = _integer(
        60,
        1,
        86_400,
        "longest wait between two republishes of one reservation (doubling from the first)",
    )
    sweep_interval_ms: int = _integer(1000, 10, 600_000, "sweeper period")
    consumer_sweepers: bool = _flag(
        True,
        "a consumer process also runs the sweepers (stranded reservations, unpaid orders,"
        " ended sales, stale stores); `false` for extra consumers that only persist (the"
        " bench's drain rows: another sale's stranded reservations are not their backlog)",
    )

    payment_provider: str = _choice(
        "none",
        PAYMENT_PROVIDERS,
        "`none`: no payment can be started (503 `PAYMENT_PROVIDER_UNAVAILABLE`), signed"
        " notifications are still applied; `sandbox`: the built-in stand-in that pays orders"
        " with no money, for the demo and tests only (`up` with demo data turns it on;"
        " `/readyz` and the banner name the provider)",
    )
    payment_secret: str | None = _secret(
        "HMAC key of payment notifications (the key shared with the provider); the derived"
        " default reveals nothing of the secret key",
        "HKDF-SHA256 of the secret key, info `" + PAYMENT_NOTIFY_KEY_LABEL.decode() + "`",
    )
    metrics_token: str | None = _secret(
        "when set, the gateway's `/metrics` needs `Authorization: Bearer <token>` (401"
        " `AUTH_REQUIRED` otherwise); unset, `/metrics` is public, so bind it to a private"
        " address",
        "unset (`up` creates `.flashsale/metrics_token`)",
    )
    metrics_port: int = _integer(
        9101,
        0,
        65535,
        "`flashsale consume` serves `/metrics` and `/healthz` here (0: off; under `up` the"
        " gateway's `/metrics` covers it)",
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every ``FLASHSALE_*`` variable; SettingsError on the first bad one."""
        e = _with_files(os.environ if env is None else env, {f.name for f in fields(cls)})
        values = {}
        for f in fields(cls):
            name = PREFIX + f.name.upper()
            raw = e.get(name)
            if raw is not None and raw.strip():
                values[f.name] = spec(f).parse(name, raw.strip())
        settings = cls(**values)
        settings._check_together()
        return settings

    def _check_together(self) -> None:
        """The rules that tie two settings together."""
        if self.redis_url is not None and "," in self.redis_url and not self.redis_cluster:
            raise SettingsError(
                f"{PREFIX}REDIS_URL: several seed nodes need {PREFIX}REDIS_CLUSTER=true"
            )
        if self.db_pool_max < self.db_pool_min:
            raise SettingsError(
                f"{PREFIX}DB_POOL_MAX={self.db_pool_max} is below {PREFIX}DB_POOL_MIN"
            )
        if self.kafka_min_insync_replicas > self.kafka_replication_factor:
            raise SettingsError(
                f"{PREFIX}KAFKA_MIN_INSYNC_REPLICAS={self.kafka_min_insync_replicas} is above "
                f"{PREFIX}KAFKA_REPLICATION_FACTOR={self.kafka_replication_factor}"
            )
        if self.revocation_max_stale_s * 1000 < 2 * self.revocation_reload_ms:
            raise SettingsError(
                f"{PREFIX}REVOCATION_MAX_STALE_S must cover two {PREFIX}REVOCATION_RELOAD_MS"
            )

    def require(self, *names: str) -> Settings:
        """Raise SettingsError naming the first of ``names`` that is unset."""
        for name in names:
            if getattr(self, name) is None:
                raise SettingsError(f"{PREFIX}{name.upper()} is required but not set")
        return self

    def _required(self, name: str) -> str:
        """The value of a required text setting; SettingsError naming it when unset."""
        value = getattr(self.require(name), name)
        assert isinstance(value, str)
        return value

    def with_(self, **changes: Any) -> Settings:
        """A copy with some fields replaced (used by the supervisor and tests)."""
        return replace(self, **changes)

    def to_env(self) -> dict[str, str]:
        """The settings as ``FLASHSALE_*`` variables, for child processes."""
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, tuple):
                text = ",".join(str(v) for v in value)
            else:
                text = str(value)
            out[PREFIX + f.name.upper()] = text
        return out

    @property
    def redis(self) -> str:
        """The Redis URL; on a cluster, the first seed node's (see :attr:`redis_seeds`)."""
        return self.redis_seeds[0]

    @property
    def redis_seeds(self) -> list[str]:
        """Every URL of ``FLASHSALE_REDIS_URL`` (a cluster's seed nodes)."""
        return [u.strip() for u in self._required("redis_url").split(",")]

    @property
    def database(self) -> str:
        return self._required("database_url")

    @property
    def kafka(self) -> str:
        return self._required("kafka_bootstrap")

    @property
    def secret(self) -> str:
        return self._required("secret_key")

    @property
    def payment_hmac_key(self) -> bytes:
        """The key of the notification HMAC: ``payment_secret`` if set, else a key derived
        from the secret key with a labelled KDF (one-way, so handing it to a provider does
        not hand over the token key)."""
        if self.payment_secret is not None:
            return self.payment_secret.encode()
        return hkdf_sha256(self.secret.encode(), PAYMENT_NOTIFY_KEY_LABEL)


# FLASHSALE_* variables that are not settings of the service: read by the test suite.
NOT_SETTINGS = frozenset({f"{PREFIX}SCREENSHOTS"})


def unknown_variables(env: Mapping[str, str] | None = None) -> list[str]:
    """One line for each ``FLASHSALE_*`` variable that names no setting (a misspelling is
    otherwise silently ignored), naming the closest known setting."""
    e = os.environ if env is None else env
    known = [PREFIX + f.name.upper() for f in fields(Settings)]
    lines = []
    for name in sorted(e):
        if not name.startswith(PREFIX) or name in NOT_SETTINGS:
            continue
        if name in known or name.removesuffix(FILE_SUFFIX) in known:
            continue
        base = name.removesuffix(FILE_SUFFIX)
        suffix = name[len(base) :]
        close = difflib.get_close_matches(base, known, n=1, cutoff=0.75)
        hint = (
            f"did you mean {close[0]}{suffix}?" if close else "the settings are in docs/settings.md"
        )
        lines.append(f"{name} is not a setting and is ignored; {hint}")
    return lines


def spec(f: Field[Any]) -> Spec:
    """How the setting of a Settings field is read and documented."""
    s = f.metadata["spec"]
    assert isinstance(s, Spec)
    return s


def _shown(f: Field[Any]) -> str:
    s = spec(f)
    if s.shown is not None:
        return s.shown
    value = f.default
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def settings_table() -> str:
    """The table of docs/settings.md: every variable, its default and what it means."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    rows += [
        f"| `{PREFIX}{f.name.upper()}` | {_shown(f)} | {spec(f).doc} |" for f in fields(Settings)
    ]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(settings_table(), end="")
