"""Accounts: registration, login, lookup, and the changes that revoke tokens.

Every change that must end the sessions of an account (role, password, disabling it,
logout) bumps ``users.token_gen`` and publishes the new generation to Redis while the
row is still locked (:func:`flashsale.sessions.publish`): concurrent bumps of one account
reach Redis in order, and if Redis cannot be told, the change is rolled back.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from typing import Any, Final

import asyncpg
from redis.asyncio import Redis

from flashsale import sessions
from flashsale.auth import (
    ROLES,
    SIGNUP,
    PasswordHashing,
    check_password,
    hash_password,
)
from flashsale.errors import (
    AccountDisabled,
    AccountExists,
    InvalidCredentials,
    NotFound,
    RateLimited,
    ValidationFailed,
)
from flashsale.paging import offset, page_of
from flashsale.stores import rediskeys

# what the owner of an account would be sent (a mail or a text in a real shop)
notices = logging.getLogger("flashsale.notices")

EMAIL_RE: Final = r"[^@ \t\n\r\x0b\x0c\x00]+@[^@ \t\n\r\x0b\x0c\x00]+\.[^@ \t\n\r\x0b\x0c\x00]+"
PHONE_RE: Final = r"\+?[0-9]{6,20}"
# The lengths a new password may have, the same through the API and the CLI.
PASSWORD_MIN_LEN: Final = 8
PASSWORD_MAX_LEN: Final = 128


def check_new_password(password: str) -> None:
    """Refuse a new password outside the allowed lengths (a validation error)."""
    if not PASSWORD_MIN_LEN <= len(password) <= PASSWORD_MAX_LEN:
        raise ValidationFailed(
            f"password must be {PASSWORD_MIN_LEN} to {PASSWORD_MAX_LEN} characters",
            fields={"password": f"{PASSWORD_MIN_LEN} to {PASSWORD_MAX_LEN} characters"},
        )


SQL_INSERT_USER = """
INSERT INTO users (email, phone, password_hash, nickname, role)
VALUES ($1, $2, $3, $4, $5)
RETURNING id, email, phone, nickname, role, token_gen, disabled_at
"""
SQL_USER_BY_LOGIN = """
SELECT id, email, phone, nickname, role, token_gen, disabled_at, password_hash
FROM users WHERE email = $1 OR phone = $1
"""
SQL_USER_BY_ID = (
    "SELECT id, email, phone, nickname, role, token_gen, disabled_at FROM users WHERE id = $1"
)
SQL_USER_BY_EMAIL_OR_PHONE = "SELECT id, email, phone FROM users WHERE email = $1 OR phone = $2"
SQL_HASH_BY_ID = "SELECT password_hash FROM users WHERE id = $1"
SQL_SET_ROLE = """
UPDATE users SET role = $2, token_gen = token_gen + 1 WHERE id = $1
RETURNING id, email, phone, nickname, role, token_gen, disabled_at
"""
SQL_SET_DISABLED = """
UPDATE users
SET disabled_at = CASE WHEN $2 THEN coalesce(disabled_at, now()) END,
    token_gen = token_gen + 1
WHERE id = $1
RETURNING id, email, phone, nickname, role, token_gen, disabled_at
"""
SQL_SET_HASH = """
UPDATE users SET password_hash = $2, token_gen = token_gen + 1 WHERE id = $1
RETURNING id, email, phone, nickname, role, token_gen, disabled_at
"""
SQL_BUMP = """
UPDATE users SET token_gen = token_gen + 1 WHERE id = $1
RETURNING id, email, phone, nickname, role, token_gen, disabled_at
"""


@dataclass(frozen=True, slots=True)
class LoginLimits:
    """Login attempts allowed in one fixed window.

    ``per_account_ip`` (one account from one address) is what stops guessing; ``per_ip``
    (one address, any account) stops one address trying many; ``per_account`` (one
    account from every address together) is high, to stop a spray from many addresses
    only: an attacker elsewhere must not be able to lock the owner out.
    """

    window_s: int = 300
    per_account_ip: int = 10
    per_ip: int = 100
    per_account: int = 1000


async def _counted(redis: Redis, keys: tuple[str, ...], window_s: int) -> list[tuple[int, int]]:
    """INCR each key (the window starts with its first attempt): [(count, ttl seconds)]."""
    async with redis.pipeline(transaction=True) as pipe:
        for key in keys:
            pipe.incr(key)
            pipe.expire(key, window_s, nx=True)
            pipe.ttl(key)
        replies = await pipe.execute()
    return [(replies[i], replies[i + 2]) for i in range(0, len(replies), 3)]


def _refuse_past(
    counts: list[tuple[int, int]],
    limits: tuple[int, ...],
    message: str = "too many login attempts; retry later",
) -> None:
    waits = [ttl for (count, ttl), limit in zip(counts, limits, strict=True) if count > limit]
    if waits:
        raise RateLimited(message, headers={"Retry-After": str(max(1, *waits))})


async def _count_attempt(redis: Redis, login: str, client_ip: str, limits: LoginLimits) -> None:
    """Count this attempt; 429 with Retry-After past a limit. Counted before any hashing.

    The address's own counts come first, and an attempt they refuse is not counted against
    the account: one address, however busy, moves the account-wide count by at most
    ``per_account_ip`` a window.
    """
    own = await _counted(
        redis,
        (rediskeys.login_account_ip(login, client_ip), rediskeys.login_ip(client_ip)),
        limits.window_s,
    )
    _refuse_past(own, (limits.per_account_ip, limits.per_ip))
    # another slot on a Redis Cluster: a transaction of its own
    _refuse_past(
        await _counted(redis, (rediskeys.login_account(login),), limits.window_s),
        (limits.per_account,),
    )


@dataclass(frozen=True, slots=True)
class User:
    id: int
    email: str | None
    phone: str | None
    nickname: str
    role: str
    token_gen: int = 0
    disabled: bool = False

    def public(self) -> dict[str, Any]:
        """Every field but the token generation, which stays on the server."""
        out = asdict(self)
        del out["token_gen"]
        return out


def _user(row: asyncpg.Record) -> User:
    return User(
        row["id"],
        row["email"],
        row["phone"],
        row["nickname"],
        row["role"],
        row["token_gen"],
        row["disabled_at"] is not None,
    )


def normalise_login(login: str) -> tuple[str | None, str | None]:
    """(email, phone) from what the user typed; emails are compared lower-case."""
    login = login.strip()
    if re.fullmatch(EMAIL_RE, login):
        return login.lower(), None
    if re.fullmatch(PHONE_RE, login):
        return None, login
    raise ValidationFailed(fields={"login": "must be an email address or a phone number"})


async def create_user(
    db: asyncpg.Pool | asyncpg.Connection,
    *,
    email: str | None,
    phone: str | None,
    password: str,
    nickname: str,
    role: str = "user",
    hashing: PasswordHashing | None = None,
) -> User:
    """A new account, or ACCOUNT_EXISTS (an operator's tool: the shop's own registration,
    :func:`register`, never says so)."""
    if email is None and phone is None:
        raise ValidationFailed(fields={"email": "email or phone is required"})
    password_hash = await hash_password(password, hashing)
    return await _insert_user(db, email, phone, password_hash, nickname, role)


async def _insert_user(
    db: asyncpg.Pool | asyncpg.Connection,
    email: str | None,
    phone: str | None,
    password_hash: str,
    nickname: str,
    role: str,
) -> User:
    try:
        row = await db.fetchrow(
            SQL_INSERT_USER, email.lower() if email else None, phone, password_hash, nickname, role
        )
    except asyncpg.UniqueViolationError:
        raise AccountExists from None
    assert row is not None
    return _user(row)


@dataclass(frozen=True, slots=True)
class RegisterLimits:
    """Registrations allowed per client IP in one fixed window."""

    window_s: int = 3600
    per_ip: int = 20


async def register(
    db: asyncpg.Pool,
    redis: Redis,
    *,
    email: str | None,
    phone: str | None,
    password: str,
    nickname: str,
    client_ip: str,
    limits: RegisterLimits,
    hashing: PasswordHashing | None = None,
) -> dict[str, Any]:
    """A shopper's registration: the same answer whether the email or phone is new or
    already has an account, so registering enumerates nothing.

    Throttled per client IP before any hashing; the password is hashed in the
    registrations' lane either way (the answer takes as long). When the email or phone
    is taken, nothing is written and the account's owner is told (a logged notification,
    where a shop would send a mail or a text).
    """
    if email is None and phone is None:
        raise ValidationFailed(fields={"email": "email or phone is required"})
    _refuse_past(
        await _counted(redis, (rediskeys.register_ip(client_ip),), limits.window_s),
        (limits.per_ip,),
        "too many registrations from this address; retry later",
    )
    email = email.lower() if email else None
    password_hash = await hash_password(password, hashing, lane=SIGNUP)
    try:
        await _insert_user(db, email, phone, password_hash, nickname, "user")
    except AccountExists:
        owner = await db.fetchrow(SQL_USER_BY_EMAIL_OR_PHONE, email, phone)
        if owner is not None:
            channel = "email" if email is not None and owner["email"] == email else "phone"
            notices.info(
                "notify user %s by %s: somebody tried to register a new account with it "
                "(if it was you, log in or reset your password)",
                owner["id"],
                channel,
            )
    return {"email": email, "phone": phone, "nickname": nickname}


async def login(
    db: asyncpg.Pool,
    redis: Redis,
    login_name: str,
    password: str,
    *,
    client_ip: str,
    limits: LoginLimits,
    hashing: PasswordHashing | None = None,
) -> User:
    """The account for these credentials, or INVALID_CREDENTIALS (the same for both cases).

    Throttled per (account, address), per address and, loosely, per account
    (:class:`LoginLimits`); an unknown account still costs one hash.
    """
    email, phone = normalise_login(login_name)
    login_key = email or phone or ""
    await _count_attempt(redis, login_key, client_ip, limits)
    row = await db.fetchrow(SQL_USER_BY_LOGIN, login_key)
    stored = None if row is None else row["password_hash"]
    if not await check_password(stored, password, hashing) or row is None:
        raise InvalidCredentials
    # the owner is in: this address's count at the account starts again, and so does the
    # spray count (one key per call: different slots on a Redis Cluster)
    await redis.delete(rediskeys.login_account_ip(login_key, client_ip))
    await redis.delete(rediskeys.login_account(login_key))
    user = _user(row)
    if user.disabled:
        raise AccountDisabled
    return user


async def get_user(db: asyncpg.Pool, user_id: int) -> User | None:
    row = await db.fetchrow(SQL_USER_BY_ID, user_id)
    return None if row is None else _user(row)


async def _bump(db: asyncpg.Pool, redis: Redis, sql: str, user_id: int, *args: Any) -> User:
    """Run one UPDATE that bumps token_gen, publish the new generation, then commit."""
    async with db.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(sql, user_id, *args)
        if row is None:
            raise NotFound("user not found")
        user = _user(row)
        await sessions.publish(redis, user.id, user.token_gen)
    return user


async def set_role(db: asyncpg.Pool, redis: Redis, user_id: int, role: str) -> User:
    if role not in ROLES:
        raise ValidationFailed(fields={"role": "must be one of " + ", ".join(ROLES)})
    return await _bump(db, redis, SQL_SET_ROLE, user_id, role)


async def set_disabled(db: asyncpg.Pool, redis: Redis, user_id: int, disabled: bool) -> User:
    return await _bump(db, redis, SQL_SET_DISABLED, user_id, disabled)


async def set_password(
    db: asyncpg.Pool,
    redis: Redis,
    user_id: int,
    password: str,
    hashing: PasswordHashing | None = None,
) -> User:
    password_hash = await hash_password(password, hashing)
    return await _bump(db, redis, SQL_SET_HASH, user_id, password_hash)


async def change_password(
    db: asyncpg.Pool,
    redis: Redis,
    user_id: int,
    old_password: str,
    new_password: str,
    hashing: PasswordHashing | None = None,
) -> User:
    stored = await db.fetchval(SQL_HASH_BY_ID, user_id)
    if stored is None:
        raise NotFound("user not found")
    if not await check_password(stored, old_password, hashing):
        raise InvalidCredentials
    return await set_password(db, redis, user_id, new_password, hashing)


async def logout(db: asyncpg.Pool, redis: Redis, user_id: int) -> User:
    """End every session of the account (every token issued so far)."""
    return await _bump(db, redis, SQL_BUMP, user_id)


SQL_SEARCH_USERS = """
SELECT id, email, phone, nickname, role, disabled_at, created_at, count(*) OVER () AS total
FROM users
WHERE ($1::text IS NULL
       OR lower(email) LIKE $1 ESCAPE '\\' OR phone LIKE $1 ESCAPE '\\'
       OR lower(nickname) LIKE $1 ESCAPE '\\' OR id = $2)
  AND ($3::text IS NULL OR role = $3)
  AND ($4::boolean IS NULL OR (disabled_at IS NOT NULL) = $4)
ORDER BY id DESC
LIMIT $5 OFFSET $6
"""


def _like_prefix(text: str) -> str:
    escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


async def search_users(
    db: asyncpg.Pool,
    *,
    q: str | None,
    role: str | None,
    disabled: bool | None,
    page: int,
    limit: int,
) -> dict[str, Any]:
    """Accounts for the admin: ``q`` is a prefix of the email, phone or nickname (any
    case), or the exact id; filtered by role and disabled state; newest first."""
    pattern = None if q is None else _like_prefix(q)
    exact_id = int(q) if q is not None and q.isdigit() and len(q) <= 18 else None
    rows = await db.fetch(
        SQL_SEARCH_USERS, pattern, exact_id, role, disabled, limit, offset(page, limit)
    )
    users = [
        {
            "id": r["id"],
            "email": r["email"],
            "phone": r["phone"],
            "nickname": r["nickname"],
            "role": r["role"],
            "disabled": r["disabled_at"] is not None,
            "disabled_at": r["disabled_at"],
            "created_at": r["created_at"],
        }
        for r in rows
    ]
    total = rows[0]["total"] if rows else 0
    return page_of("users", users, total=total, page=page, limit=limit)
