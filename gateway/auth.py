"""Passwords, signed tokens and the role checks that handlers call.

Tokens are HS256 JWTs carrying the user id (``sub``), ``role`` and expiry. The
gateway verifies them in-process with no database or Redis call; a small cache of
already-verified tokens keeps a stampede of the same shoppers from paying the HMAC
and JSON cost on every attempt (the expiry is still checked on each use).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Final

import jwt
from aiohttp import web
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from gateway.errors import AppError, Forbidden, Unauthorized

ROLES: Final = ("user", "merchant", "admin")
ALGORITHM: Final = "HS256"
_CACHE_MAX = 100_000


class TokenExpired(Unauthorized):
    code = "TOKEN_EXPIRED"
    default_message = "token has expired"


class TokenMalformed(Unauthorized):
    code = "TOKEN_MALFORMED"
    default_message = "token is malformed"


class TokenInvalid(Unauthorized):
    code = "TOKEN_INVALID"
    default_message = "token signature is invalid"


class WrongPassword(Unauthorized):
    code = "WRONG_PASSWORD"
    default_message = "wrong password"


class UnknownUser(Unauthorized):
    code = "UNKNOWN_USER"
    default_message = "no such user"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: verified from the token alone."""

    user_id: int
    role: str
    expires_at: float


class TokenService:
    """Issues and verifies tokens with one secret."""

    def __init__(self, secret: str, ttl_s: int) -> None:
        self._secret = secret
        self.ttl_s = ttl_s
        self._cache: dict[str, Principal] = {}

    def issue(self, user_id: int, role: str, *, ttl_s: int | None = None) -> str:
        now = int(time.time())
        claims = {"sub": str(user_id), "role": role, "iat": now, "exp": now + (ttl_s or self.ttl_s)}
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def verify(self, token: str) -> Principal:
        cached = self._cache.get(token)
        if cached is not None:
            if cached.expires_at <= time.time():
                raise TokenExpired
            return cached
        try:
            claims = jwt.decode(
                token, self._secret, algorithms=[ALGORITHM], options={"require": ["exp", "sub"]}
            )
        except jwt.ExpiredSignatureError:
            raise TokenExpired from None
        except jwt.InvalidSignatureError:
            raise TokenInvalid from None
        except jwt.PyJWTError:
            raise TokenMalformed from None
        sub, role = claims.get("sub"), claims.get("role")
        if not isinstance(sub, str) or not sub.isdigit() or role not in ROLES:
            raise TokenMalformed
        principal = Principal(int(sub), role, float(claims["exp"]))
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[token] = principal
        return principal


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise TokenMalformed("Authorization header must be 'Bearer <token>'")
    return token.strip()


def authenticate(request: web.Request, tokens: TokenService) -> Principal:
    """The caller's principal, or 401."""
    token = bearer(request)
    if token is None:
        raise Unauthorized
    return tokens.verify(token)


def optional_principal(request: web.Request, tokens: TokenService) -> Principal | None:
    """The caller's principal if a token was sent (a bad token is still a 401)."""
    token = bearer(request)
    return None if token is None else tokens.verify(token)


def require_role(principal: Principal, *roles: str) -> Principal:
    if principal.role not in roles:
        raise Forbidden(f"requires role: {' or '.join(roles)}")
    return principal


_HASHER = PasswordHasher()


async def hash_password(password: str) -> str:
    """argon2id hash, computed off the event loop."""
    return await asyncio.to_thread(_HASHER.hash, password)


async def check_password(stored_hash: str, password: str) -> bool:
    def _verify() -> bool:
        try:
            return _HASHER.verify(stored_hash, password)
        except (VerificationError, InvalidHashError):
            return False

    return await asyncio.to_thread(_verify)


__all__ = [
    "AppError",
    "Principal",
    "TokenExpired",
    "TokenInvalid",
    "TokenMalformed",
    "TokenService",
    "UnknownUser",
    "WrongPassword",
    "authenticate",
    "check_password",
    "hash_password",
    "optional_principal",
    "require_role",
]
