"""Settings from ``FLASHSALE_*`` environment variables: one frozen dataclass.

Every variable is listed in the README with its default. A malformed value, or a
missing one that the chosen command needs, raises :class:`SettingsError` whose
message is one line naming the variable; the CLI prints it and exits 2.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

PREFIX = "FLASHSALE_"
# "none": no provider takes payments (notifications are still verified and applied);
# "sandbox": the built-in stand-in that pays orders with no money (demo and tests only).
PAYMENT_PROVIDERS = ("none", "sandbox")
# HKDF "info" of the notify key derived from the secret key when no PAYMENT_SECRET is set:
# a provider given that key learns nothing about the token signing key.
PAYMENT_NOTIFY_KEY_LABEL = b"flashsale/payment-notify-hmac/v1"


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


def _int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{PREFIX}{name}={raw!r} is not an integer") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{PREFIX}{name}={value} is out of range [{lo}, {hi}]")
    return value


def _float(env: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{PREFIX}{name}={raw!r} is not a number") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{PREFIX}{name}={value} is out of range [{lo}, {hi}]")
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _get(env, name)
    if raw is None:
        return default
    low = raw.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise SettingsError(f"{PREFIX}{name}={raw!r} is not a boolean (use true/false)")


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
    database_url: str | None = None
    kafka_bootstrap: str | None = None
    secret_key: str | None = None

    http_host: str = "127.0.0.1"
    http_port: int = 8080
    workers: int = 2
    max_body_bytes: int = 1 << 20
    access_log: bool = True
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
    metrics_token: str | None = None

    revocation_reload_ms: int = 2000
    revocation_max_stale_s: int = 15
    login_window_s: int = 300
    login_account_attempts: int = 10
    login_ip_attempts: int = 100
    login_hash_concurrency: int = 2
    login_hash_queue: int = 32

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every ``FLASHSALE_*`` variable; SettingsError on the first bad one."""
        e = os.environ if env is None else env
        level = (_get(e, "LOG_LEVEL") or "INFO").upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise SettingsError(
                f"{PREFIX}LOG_LEVEL={level!r} must be DEBUG, INFO, WARNING or ERROR"
            )
        machine_raw = _get(e, "MACHINE_ID")
        secret = _get(e, "SECRET_KEY")
        if secret is not None and len(secret) < 32:
            raise SettingsError(f"{PREFIX}SECRET_KEY must be at least 16 characters")
        provider = (_get(e, "PAYMENT_PROVIDER") or "none").lower()
        if provider not in PAYMENT_PROVIDERS:
            raise SettingsError(
                f"{PREFIX}PAYMENT_PROVIDER={provider!r} must be one of: "
                + ", ".join(PAYMENT_PROVIDERS)
            )
        pool_min = _int(e, "DB_POOL_MIN", 2, 0, 1000)
        pool_max = _int(e, "DB_POOL_MAX", 10, 1, 1000)
        if pool_max < pool_min:
            raise SettingsError(f"{PREFIX}DB_POOL_MAX={pool_max} is below {PREFIX}DB_POOL_MIN")
        reload_ms = _int(e, "REVOCATION_RELOAD_MS", 2000, 50, 60_000)
        max_stale_s = _int(e, "REVOCATION_MAX_STALE_S", 15, 1, 3600)
        if max_stale_s * 1000 < 2 * reload_ms:
            raise SettingsError(
                f"{PREFIX}REVOCATION_MAX_STALE_S must cover two {PREFIX}REVOCATION_RELOAD_MS"
            )
        return cls(
            redis_url=_url(e, "REDIS_URL", ("redis", "rediss", "unix")),
            database_url=_url(e, "DATABASE_URL", ("postgres", "postgresql")),
            kafka_bootstrap=_bootstrap(e, "KAFKA_BOOTSTRAP"),
            secret_key=secret,
            http_host=_get(e, "HTTP_HOST") or "127.0.0.1",
            http_port=_int(e, "HTTP_PORT", 8080, 0, 65535),
            workers=_int(e, "WORKERS", 2, 1, 256),
            max_body_bytes=_int(e, "MAX_BODY_BYTES", 1 << 20, 1024, 1 << 30),
            access_log=_bool(e, "ACCESS_LOG", True),
            log_level=level,
            trusted_proxies=_networks(e, "TRUSTED_PROXIES"),
            data_dir=_get(e, "DATA_DIR") or ".flashsale",
            machine_id=None if machine_raw is None else _int(e, "MACHINE_ID", 0, 0, 999),
            token_ttl_s=_int(e, "TOKEN_TTL_S", 24 * 3600, 1, 365 * 24 * 3600),
            db_pool_min=pool_min,
            db_pool_max=pool_max,
            kafka_enable_idempotence=_bool(e, "KAFKA_ENABLE_IDEMPOTENCE", False),
            kafka_orders_topic=_get(e, "KAFKA_ORDERS_TOPIC") or "flashsale.orders",
            kafka_dlq_topic=_get(e, "KAFKA_DLQ_TOPIC") or "flashsale.orders.dlq",
            kafka_partitions=_int(e, "KAFKA_PARTITIONS", 8, 1, 1024),
            kafka_linger_ms=_int(e, "KAFKA_LINGER_MS", 0, 0, 1000),
            kafka_produce_timeout_ms=_int(e, "KAFKA_PRODUCE_TIMEOUT_MS", 5000, 50, 120_000),
            kafka_session_timeout_ms=_int(e, "KAFKA_SESSION_TIMEOUT_MS", 6000, 1000, 300_000),
            kafka_heartbeat_interval_ms=_int(e, "KAFKA_HEARTBEAT_INTERVAL_MS", 500, 100, 60_000),
            kafka_consumer_group=_get(e, "KAFKA_CONSUMER_GROUP") or "flashsale-orders",
            consumer_batch_max=_int(e, "CONSUMER_BATCH_MAX", 2000, 1, 100_000),
            payment_window_s=_int(e, "PAYMENT_WINDOW_S", 900, 1, 7 * 24 * 3600),
            rate_user_per_s=_float(e, "RATE_USER_PER_S", 5.0, 0.001, 1e6),
            rate_user_burst=_int(e, "RATE_USER_BURST", 10, 1, 1_000_000),
            rate_ip_per_s=_float(e, "RATE_IP_PER_S", 200.0, 0.001, 1e7),
            rate_ip_burst=_int(e, "RATE_IP_BURST", 400, 1, 10_000_000),
            stranded_after_s=_int(e, "STRANDED_AFTER_S", 5, 1, 3600),
            claim_stale_s=_int(e, "CLAIM_STALE_S", 30, 1, 86_400),
            republish_max_backoff_s=_int(e, "REPUBLISH_MAX_BACKOFF_S", 60, 1, 86_400),
            sweep_interval_ms=_int(e, "SWEEP_INTERVAL_MS", 1000, 10, 600_000),
            payment_secret=_get(e, "PAYMENT_SECRET"),
            payment_provider=provider,
            metrics_port=_int(e, "METRICS_PORT", 9101, 0, 65535),
            max_per_user_default=_int(e, "MAX_PER_USER_DEFAULT", 20, 1, 1_000_000),
            presale_hold_s=_int(e, "PRESALE_HOLD_S", 1800, 1, 30 * 24 * 3600),
            metrics_token=_get(e, "METRICS_TOKEN"),
            revocation_reload_ms=reload_ms,
            revocation_max_stale_s=max_stale_s,
            login_window_s=_int(e, "LOGIN_WINDOW_S", 300, 1, 24 * 3600),
            login_account_attempts=_int(e, "LOGIN_ACCOUNT_ATTEMPTS", 10, 1, 1_000_000),
            login_ip_attempts=_int(e, "LOGIN_IP_ATTEMPTS", 100, 1, 10_000_000),
            login_hash_concurrency=_int(e, "LOGIN_HASH_CONCURRENCY", 2, 1, 256),
            login_hash_queue=_int(e, "LOGIN_HASH_QUEUE", 32, 0, 100_000),
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
        self.require("redis_url")
        assert self.redis_url is not None
        return self.redis_url

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
