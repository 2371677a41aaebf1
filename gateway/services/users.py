"""Accounts: registration, login and lookup."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

import asyncpg

from gateway.auth import UnknownUser, WrongPassword, check_password, hash_password
from gateway.errors import Conflict, ValidationFailed

EMAIL_RE: Final = r"[^@ \t\n\r\x0b\x0c\x00]+@[^@ \t\n\r\x0b\x0c\x00]+\.[^@ \t\n\r\x0b\x0c\x00]+"
PHONE_RE: Final = r"\+?[0-9]{6,20}"

SQL_INSERT_USER = """
INSERT INTO users (email, phone, password_hash, nickname, role)
VALUES ($1, $2, $3, $4, $5)
RETURNING id, email, phone, nickname, role, created_at
"""
SQL_USER_BY_LOGIN = """
SELECT id, email, phone, nickname, role, password_hash, created_at
FROM users WHERE email = $1 OR phone = $1
"""
SQL_USER_BY_ID = "SELECT id, email, phone, nickname, role, created_at FROM users WHERE id = $1"


@dataclass(frozen=True, slots=True)
class User:
    id: int
    email: str | None
    phone: str | None
    nickname: str
    role: str

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "email": self.email,
            "phone": self.phone,
            "nickname": self.nickname,
            "role": self.role,
        }


def _user(row: asyncpg.Record) -> User:
    return User(row["id"], row["email"], row["phone"], row["nickname"], row["role"])


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
) -> User:
    if email is None and phone is None:
        raise ValidationFailed(fields={"email": "email or phone is required"})
    password_hash = await hash_password(password)
    try:
        row = await db.fetchrow(
            SQL_INSERT_USER, email.lower() if email else None, phone, password_hash, nickname, role
        )
    except asyncpg.UniqueViolationError:
        raise Conflict(
            "an account with this email or phone already exists", code="ACCOUNT_EXISTS"
        ) from None
    assert row is not None
    return _user(row)


async def login(db: asyncpg.Pool, login_name: str, password: str) -> User:
    email, phone = normalise_login(login_name)
    row = await db.fetchrow(SQL_USER_BY_LOGIN, email or phone)
    if row is None:
        raise UnknownUser
    if not await check_password(row["password_hash"], password):
        raise WrongPassword
    return _user(row)


async def get_user(db: asyncpg.Pool, user_id: int) -> User | None:
    row = await db.fetchrow(SQL_USER_BY_ID, user_id)
    return None if row is None else _user(row)
