"""Settings from ``FLASHSALE_*`` environment variables: one frozen dataclass.

Every variable is listed in the README with its default. A malformed value, or a
missing one that the chosen command needs, raises :class:`SettingsError` whose
message is one line naming the variable; the CLI prints it and exits 2.
"""

from __future__ import annotations

import difflib
import hashlib
import hmac
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

PREFIX = "FLASHSALE_"
# "none": no provider takes payments (notifications are still verified and applied);
# "sandbox": the built-in stand-in that pays orders with no money (demo and tests only).
PAYMENT_PROVIDERS = ("none", "sandbox")
# aiokafka's partition assignors (it has no cooperative-sticky, see flashsale/stores/kafka.py)
KAFKA_ASSIGNORS = ("sticky", "roundrobin", "range")
# HKDF "info" of the notify key derived from the secret key when no PAYMENT_SECRET is set:
# a provider given that key learns nothing about the token signing key.
PAYMENT_NOTIFY_KEY_LABEL = b"flashsale/payment-notify-hmac/v1"
# HS256 wants a key at least as long as its 32-byte output (RFC 7518 §3.2).
MIN_SECRET_CHARS = 32


def hkdf_sha256(ikm: bytes, info: bytes, salt: bytes = b"") -> bytes:
    """A 32-byte key from HKDF-SHA256 (RFC 5869): extract, then one expand block."""
    prk = hmac.new(salt or bytes(hashlib.sha256().digest_size), ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


class SettingsError(Exception):
    """A setting is missing or malformed."""


def _get(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(PREFIX + name)
    if raw is None or raw.strip() == "":
        return None
    return raw.strip()


def _to_int(name: str, raw: str, lo: int, hi: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{PREFIX}{name}={raw!r} is not an integer") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{PREFIX}{name}={value} is out of range [{lo}, {hi}]")
    return value


def _to_float(name: str, raw: str, lo: float, hi: float) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{PREFIX}{name}={raw!r} is not a number") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{PREFIX}{name}={value} is out of range [{lo}, {hi}]")
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _to_bool(name: str, raw: str) -> bool:
    low = raw.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise SettingsError(f"{PREFIX}{name}={raw!r} is not a boolean (use true/false)")


class _Env:
    """Reads the variable of a Settings field; an unset one gives the field's default, so
    each default is written once, in the dataclass."""

    def __init__(self, env: Mapping[str, str], defaults: Mapping[str, Any]) -> None:
        self.env = env
        self.defaults = defaults

    def raw(self, field: str) -> str | None:
        return _get(self.env, field.upper())

    def text(self, field: str) -> str:
        raw = self.raw(field)
        return str(self.defaults[field]) if raw is None else raw

    def integer(self, field: str, lo: int, hi: int) -> int:
        raw = self.raw(field)
        return int(self.defaults[field]) if raw is None else _to_int(field.upper(), raw, lo, hi)

    def number(self, field: str, lo: float, hi: float) -> float:
        raw = self.raw(field)
        if raw is None:
            return float(self.defaults[field])
        return _to_float(field.upper(), raw, lo, hi)

    def flag(self, field: str) -> bool:
        raw = self.raw(field)
        return bool(self.defaults[field]) if raw is None else _to_bool(field.upper(), raw)


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


def _url(env: Mapping[str, str], name: str, schemes: tuple[str, ...]) -> str | None:
    raw = _get(env, name)
    if raw is None:
        return None
    if not raw.startswith(tuple(s + "://" for s in schemes)):
        raise SettingsError(
            f"{PREFIX}{name}={raw!r} must start with one of: "
            + ", ".join(s + "://" for s in schemes)
        )
    return raw


def _redis_url(raw: str | None, cluster: bool) -> str | None:
    # The join path's lean connection (flashsale/stores/redisbatch.py) speaks plain TCP only: a TLS
    # or unix-socket URL would pass here and then fail at start, so it is refused here.
    if raw is None:
        return None
    urls = [u.strip() for u in raw.split(",")]
    if len(urls) > 1 and not cluster:
        raise SettingsError(
            f"{PREFIX}REDIS_URL: several seed nodes need {PREFIX}REDIS_CLUSTER=true"
        )
    if not all(u.startswith("redis://") for u in urls):
        raise SettingsError(f"{PREFIX}REDIS_URL: the join path supports redis:// only")
    return raw


def _bootstrap(env: Mapping[str, str], name: str) -> str | None:
    raw = _get(env, name)
    if raw is None:
        return None
    for part in raw.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise SettingsError(f"{PREFIX}{name}={raw!r} must be host:port[,host:port...]")
    return raw


def _networks(
    env: Mapping[str, str], name: str
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    raw = _get(env, name)
    if raw is None:
        return ()
    nets = []
    for part in raw.split(","):
        try:
            nets.append(ipaddress.ip_network(part.strip(), strict=False))
        except ValueError:
            raise SettingsError(f"{PREFIX}{name}: {part.strip()!r} is not an IP or CIDR") from None
    return tuple(nets)


@dataclass(frozen=True, slots=True)
class Settings:
    """Every tunable of the gateway, the consumers and the supervisor."""

    redis_url: str | None = None
    redis_cluster: bool = False
    redis_wait_replicas: int = 0
    redis_wait_timeout_ms: int = 500
    database_url: str | None = None
    kafka_bootstrap: str | None = None
    secret_key: str | None = None

    http_host: str = "127.0.0.1"
    http_port: int = 8080
    workers: int = 2
    max_body_bytes: int = 1 << 20
    access_log: bool = True
    # the join route served on the connection below aiohttp (gateway/fastjoin.py)
    join_fast_path: bool = True
    log_level: str = "INFO"
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    data_dir: str = ".flashsale"
    machine_id: int | None = None

    token_ttl_s: int = 24 * 3600
    db_pool_min: int = 2
    db_pool_max: int = 10

    kafka_enable_idempotence: bool = False
    kafka_orders_topic: str = "flashsale.orders"
    kafka_dlq_topic: str = "flashsale.orders.dlq"
    kafka_partitions: int = 8
    kafka_linger_ms: int = 0
    kafka_produce_timeout_ms: int = 5000
    kafka_session_timeout_ms: int = 6000
    kafka_heartbeat_interval_ms: int = 500
    kafka_consumer_group: str = "flashsale-orders"
    kafka_replication_factor: int = 1
    kafka_min_insync_replicas: int = 1
    kafka_assignor: str = "sticky"
    consumer_batch_max: int = 2000

    payment_window_s: int = 900
    rate_user_per_s: float = 5.0
    rate_user_burst: int = 10
    rate_ip_per_s: float = 200.0
    rate_ip_burst: int = 400
    stranded_after_s: int = 5
    claim_stale_s: int = 30
    republish_max_backoff_s: int = 60
    sweep_interval_ms: int = 1000
    payment_secret: str | None = None
    payment_provider: str = "none"
    metrics_port: int = 9101
    max_per_user_default: int = 20
    presale_hold_s: int = 1800
    # Waiting room of queued sales (a sale's own queue settings override these).
    queue_admit_per_s: float = 50.0  # 0: follow the measured accept rate
    queue_overbook: float = 1.2
    queue_join_window_s: int = 60
    queue_opens_before_s: int = 900
    queue_tick_ms: int = 250
    metrics_token: str | None = None

    # Event streams (gateway/streams.py): per worker, from one address and in all; lifetime
    stream_per_address: int = 20
    stream_per_worker: int = 1000
    stream_max_s: int = 1800

    revocation_reload_ms: int = 2000
    revocation_max_stale_s: int = 15
    login_window_s: int = 300
    login_account_ip_attempts: int = 10
    login_account_attempts: int = 1000
    login_ip_attempts: int = 100
    login_hash_concurrency: int = 2
    login_hash_queue: int = 32
    # Contingency plans (flashsale/plans.py)
    plan_poll_ms: int = 500
    plan_arm_after_s: float = 3.0
    plan_disarm_after_s: float = 10.0
    shed_cpu_percent: float = 0.0
    register_window_s: int = 3600
    register_ip_attempts: int = 20
    register_hash_concurrency: int = 1
    register_hash_queue: int = 8

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every ``FLASHSALE_*`` variable; SettingsError on the first bad one."""
        e = _with_files(os.environ if env is None else env, {f.name for f in fields(cls)})
        r = _Env(e, {f.name: f.default for f in fields(cls)})
        level = r.text("log_level").upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise SettingsError(
                f"{PREFIX}LOG_LEVEL={level!r} must be DEBUG, INFO, WARNING or ERROR"
            )
        secret = r.raw("secret_key")
        if secret is not None and len(secret) < MIN_SECRET_CHARS:
            raise SettingsError(
                f"{PREFIX}SECRET_KEY must be at least {MIN_SECRET_CHARS} characters"
            )
        provider = r.text("payment_provider").lower()
        if provider not in PAYMENT_PROVIDERS:
            raise SettingsError(
                f"{PREFIX}PAYMENT_PROVIDER={provider!r} must be one of: "
                + ", ".join(PAYMENT_PROVIDERS)
            )
        pool_min = r.integer("db_pool_min", 0, 1000)
        pool_max = r.integer("db_pool_max", 1, 1000)
        if pool_max < pool_min:
            raise SettingsError(f"{PREFIX}DB_POOL_MAX={pool_max} is below {PREFIX}DB_POOL_MIN")
        replication = r.integer("kafka_replication_factor", 1, 16)
        min_isr = r.integer("kafka_min_insync_replicas", 1, 16)
        if min_isr > replication:
            raise SettingsError(
                f"{PREFIX}KAFKA_MIN_INSYNC_REPLICAS={min_isr} is above "
                f"{PREFIX}KAFKA_REPLICATION_FACTOR={replication}"
            )
        assignor = r.text("kafka_assignor").lower()
        if assignor not in KAFKA_ASSIGNORS:
            raise SettingsError(
                f"{PREFIX}KAFKA_ASSIGNOR={assignor!r} must be one of: " + ", ".join(KAFKA_ASSIGNORS)
            )
        reload_ms = r.integer("revocation_reload_ms", 50, 60_000)
        max_stale_s = r.integer("revocation_max_stale_s", 1, 3600)
        if max_stale_s * 1000 < 2 * reload_ms:
            raise SettingsError(
                f"{PREFIX}REVOCATION_MAX_STALE_S must cover two {PREFIX}REVOCATION_RELOAD_MS"
            )
        return cls(
            redis_url=_redis_url(r.raw("redis_url"), r.flag("redis_cluster")),
            redis_cluster=r.flag("redis_cluster"),
            redis_wait_replicas=r.integer("redis_wait_replicas", 0, 16),
            redis_wait_timeout_ms=r.integer("redis_wait_timeout_ms", 1, 60_000),
            database_url=_url(e, "DATABASE_URL", ("postgres", "postgresql")),
            kafka_bootstrap=_bootstrap(e, "KAFKA_BOOTSTRAP"),
            secret_key=secret,
            http_host=r.text("http_host"),
            http_port=r.integer("http_port", 0, 65535),
            workers=r.integer("workers", 1, 256),
            max_body_bytes=r.integer("max_body_bytes", 1024, 1 << 30),
            access_log=r.flag("access_log"),
            join_fast_path=r.flag("join_fast_path"),
            log_level=level,
            trusted_proxies=_networks(e, "TRUSTED_PROXIES"),
            data_dir=r.text("data_dir"),
            machine_id=None if r.raw("machine_id") is None else r.integer("machine_id", 0, 999),
            token_ttl_s=r.integer("token_ttl_s", 1, 365 * 24 * 3600),
            db_pool_min=pool_min,
            db_pool_max=pool_max,
            kafka_enable_idempotence=r.flag("kafka_enable_idempotence"),
            kafka_orders_topic=r.text("kafka_orders_topic"),
            kafka_dlq_topic=r.text("kafka_dlq_topic"),
            kafka_partitions=r.integer("kafka_partitions", 1, 1024),
            kafka_linger_ms=r.integer("kafka_linger_ms", 0, 1000),
            kafka_produce_timeout_ms=r.integer("kafka_produce_timeout_ms", 50, 120_000),
            kafka_session_timeout_ms=r.integer("kafka_session_timeout_ms", 1000, 300_000),
            kafka_heartbeat_interval_ms=r.integer("kafka_heartbeat_interval_ms", 100, 60_000),
            kafka_consumer_group=r.text("kafka_consumer_group"),
            kafka_replication_factor=replication,
            kafka_min_insync_replicas=min_isr,
            kafka_assignor=assignor,
            consumer_batch_max=r.integer("consumer_batch_max", 1, 100_000),
            payment_window_s=r.integer("payment_window_s", 1, 7 * 24 * 3600),
            rate_user_per_s=r.number("rate_user_per_s", 0.001, 1e6),
            rate_user_burst=r.integer("rate_user_burst", 1, 1_000_000),
            rate_ip_per_s=r.number("rate_ip_per_s", 0.001, 1e7),
            rate_ip_burst=r.integer("rate_ip_burst", 1, 10_000_000),
            stranded_after_s=r.integer("stranded_after_s", 1, 3600),
            claim_stale_s=r.integer("claim_stale_s", 1, 86_400),
            republish_max_backoff_s=r.integer("republish_max_backoff_s", 1, 86_400),
            sweep_interval_ms=r.integer("sweep_interval_ms", 10, 600_000),
            payment_secret=r.raw("payment_secret"),
            payment_provider=provider,
            metrics_port=r.integer("metrics_port", 0, 65535),
            max_per_user_default=r.integer("max_per_user_default", 1, 1_000_000),
            presale_hold_s=r.integer("presale_hold_s", 1, 30 * 24 * 3600),
            queue_admit_per_s=r.number("queue_admit_per_s", 0, 1e6),
            queue_overbook=r.number("queue_overbook", 1.0, 10.0),
            queue_join_window_s=r.integer("queue_join_window_s", 5, 3600),
            queue_opens_before_s=r.integer("queue_opens_before_s", 0, 7 * 24 * 3600),
            queue_tick_ms=r.integer("queue_tick_ms", 20, 5000),
            metrics_token=r.raw("metrics_token"),
            stream_per_address=r.integer("stream_per_address", 1, 1_000_000),
            stream_per_worker=r.integer("stream_per_worker", 1, 10_000_000),
            stream_max_s=r.integer("stream_max_s", 1, 7 * 24 * 3600),
            revocation_reload_ms=reload_ms,
            revocation_max_stale_s=max_stale_s,
            login_window_s=r.integer("login_window_s", 1, 24 * 3600),
            login_account_ip_attempts=r.integer("login_account_ip_attempts", 1, 1_000_000),
            login_account_attempts=r.integer("login_account_attempts", 1, 10_000_000),
            login_ip_attempts=r.integer("login_ip_attempts", 1, 10_000_000),
            login_hash_concurrency=r.integer("login_hash_concurrency", 1, 256),
            login_hash_queue=r.integer("login_hash_queue", 0, 100_000),
            plan_poll_ms=r.integer("plan_poll_ms", 50, 10_000),
            plan_arm_after_s=r.number("plan_arm_after_s", 0.0, 3600.0),
            plan_disarm_after_s=r.number("plan_disarm_after_s", 0.0, 3600.0),
            shed_cpu_percent=r.number("shed_cpu_percent", 0.0, 100.0),
            register_window_s=r.integer("register_window_s", 1, 7 * 24 * 3600),
            register_ip_attempts=r.integer("register_ip_attempts", 1, 10_000_000),
            register_hash_concurrency=r.integer("register_hash_concurrency", 1, 256),
            register_hash_queue=r.integer("register_hash_queue", 0, 100_000),
        )

    def require(self, *names: str) -> Settings:
        """Raise SettingsError naming the first of ``names`` that is unset."""
        for name in names:
            if getattr(self, name) is None:
                raise SettingsError(f"{PREFIX}{name.upper()} is required but not set")
        return self

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
        self.require("redis_url")
        assert self.redis_url is not None
        return self.redis_url.split(",")[0].strip()

    @property
    def redis_seeds(self) -> list[str]:
        """Every URL of ``FLASHSALE_REDIS_URL`` (a cluster's seed nodes)."""
        self.require("redis_url")
        assert self.redis_url is not None
        return [u.strip() for u in self.redis_url.split(",")]

    @property
    def database(self) -> str:
        self.require("database_url")
        assert self.database_url is not None
        return self.database_url

    @property
    def kafka(self) -> str:
        self.require("kafka_bootstrap")
        assert self.kafka_bootstrap is not None
        return self.kafka_bootstrap

    @property
    def secret(self) -> str:
        self.require("secret_key")
        assert self.secret_key is not None
        return self.secret_key

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
