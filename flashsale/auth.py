"""Passwords, signed tokens and role checks (extracting a token from a request: gateway/auth.py).

Tokens are HS256 JWTs carrying the user id (``sub``), ``role`` and expiry. The
gateway verifies them in-process with no database or Redis call; a small cache of
already-verified tokens keeps a stampede of the same shoppers from paying the HMAC
and JSON cost on every attempt (the expiry is still checked on each use).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import itertools
import re
import secrets
import time
from collections.abc import Callable
from typing import Annotated, Final, Literal, NamedTuple, Protocol, TypeVar, get_args

import jwt
import msgspec
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from flashsale.errors import (
    Forbidden,
    RevocationUnavailable,
    ServiceUnavailable,
    TokenExpired,
    TokenInvalid,
    TokenMalformed,
    TokenRevoked,
    Unauthorized,
)
from flashsale.settings import TOKEN_CACHE_SIZE

_T = TypeVar("_T")

Role = Literal["user", "merchant", "admin"]
ROLES: Final[tuple[str, ...]] = get_args(Role)
ALGORITHM: Final = "HS256"
# a full cache forgets this share of its oldest entries at once: clearing it all would make
# every shopper of the moment pay the full check again in the same second, one at a time
# would walk the dict's start on every miss
_CACHE_EVICT_SHARE = 64
# base64url of {"alg":"HS256","typ":"JWT"}, the header PyJWT writes for our tokens
_HEADER_B64: Final = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
# three unpadded base64url segments: anything else (padding, "@@@@", spaces) is refused
# before decoding, because Python's base64 silently skips characters outside the alphabet
_TOKEN_SHAPE: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_FROM_URLSAFE: Final = bytes.maketrans(b"-_", b"+/")


class _Claims(msgspec.Struct):
    """The claims a token must carry, typed (``iat`` and any other claim are ignored): a
    bool is refused where a number is due, a ``sub`` is ASCII digits only."""

    sub: Annotated[str, msgspec.Meta(pattern=r"\A[0-9]+\Z")]
    role: Role
    exp: int | float
    gen: Annotated[int, msgspec.Meta(ge=0)] = 0


_CLAIMS: Final = msgspec.json.Decoder(_Claims)


class Principal(NamedTuple):
    """Who is calling: verified from the token alone.

    A tuple of atoms, so the garbage collector stops tracking it: a cache of a hundred
    thousand shoppers then adds nothing to a full collection's pause.
    """

    user_id: int
    role: str
    expires_at: float
    gen: int = 0


class Revocations(Protocol):
    """The revocation list a token service reads (``flashsale.sessions.Revocations`` is
    this worker's copy): each user's current generation and how fresh the copy is."""

    generations: dict[int, int]
    max_stale_s: float
    synced_at: float  # time.time() when the list was last confirmed

    def current(self, user_id: int) -> int: ...


class TokenService:
    """Issues and verifies tokens with one secret.

    With ``revocations`` (the app's), a token whose generation is older than the user's
    current one is refused: an in-process dict lookup, no I/O.
    """

    def __init__(
        self,
        secret: str,
        ttl_s: int,
        *,
        revocations: Revocations | None = None,
        cache_size: int = TOKEN_CACHE_SIZE,
    ) -> None:
        self._secret = secret
        self._key = secret.encode()
        # keyed once: each check copies it rather than hashing the key's pads again
        self._mac = hmac.new(self._key, digestmod=hashlib.sha256)
        self.ttl_s = ttl_s
        self.revocations = revocations
        self._cache: dict[str, Principal] = {}
        self._cache_size = cache_size
        self._evict = max(1, cache_size // _CACHE_EVICT_SHARE)

    def issue(self, user_id: int, role: str, *, gen: int = 0, ttl_s: int | None = None) -> str:
        if self.revocations is not None:
            # a bump this worker heard of may not be committed yet; never issue below it
            gen = max(gen, self.revocations.current(user_id))
        now = int(time.time())
        claims = {
            "sub": str(user_id),
            "role": role,
            "gen": gen,
            "iat": now,
            "exp": now + (ttl_s or self.ttl_s),
        }
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def verify(self, token: str) -> Principal:
        cached = self._cache.get(token)
        if cached is None:
            # only the one canonical spelling of a token verifies, so the cache holds at
            # most one entry per issued token
            if not _TOKEN_SHAPE.fullmatch(token):
                raise TokenMalformed
            cached = self._fast_verify(token) or self._slow_verify(token)
            if len(self._cache) >= self._cache_size:
                for oldest in list(itertools.islice(self._cache, self._evict)):
                    del self._cache[oldest]
            self._cache[token] = cached
        now = time.time()
        if cached.expires_at <= now:
            raise TokenExpired
        revocations = self.revocations
        if revocations is not None:
            if now - revocations.synced_at > revocations.max_stale_s:
                raise RevocationUnavailable
            if cached.gen < revocations.generations.get(cached.user_id, 0):
                raise TokenRevoked
        return cached

    def _fast_verify(self, token: str) -> Principal | None:
        """HS256 tokens in the exact shape we issue, checked without PyJWT's generality.

        A stampede brings tens of thousands of fresh tokens; this costs a few microseconds
        each. Anything unusual returns None and goes through PyJWT, which classifies it.
        """
        header, _, rest = token.partition(".")
        payload, _, signature = rest.partition(".")
        if header != _HEADER_B64 or not payload or not signature:
            return None
        mac = self._mac.copy()
        mac.update(token[: len(header) + len(payload) + 1].encode())
        # compare encoded forms: the spare bits of the last base64 character must be zero
        if not hmac.compare_digest(_b64url(mac.digest()), signature.encode()):
            raise TokenInvalid
        try:  # the alphabet was checked (_TOKEN_SHAPE): only the padding is missing
            raw = binascii.a2b_base64(payload.encode().translate(_FROM_URLSAFE) + b"==")
            claims = _CLAIMS.decode(raw)
        except (binascii.Error, msgspec.DecodeError):
            return None  # PyJWT says what is wrong with it
        return Principal(int(claims.sub), claims.role, float(claims.exp), claims.gen)

    def _slow_verify(self, token: str) -> Principal:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                options={"require": ["exp", "sub"], "verify_exp": False},
            )
        except jwt.InvalidSignatureError:
            raise TokenInvalid from None
        except jwt.PyJWTError:
            raise TokenMalformed from None
        signature = token.rpartition(".")[2]
        decoded = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
        if _b64url(decoded) != signature.encode():
            raise TokenInvalid
        return _principal(claims)

    def cached(self) -> int:
        """How many verified tokens the cache holds."""
        return len(self._cache)

    @property
    def cache_size(self) -> int:
        """How many verified tokens the cache holds at most."""
        return self._cache_size


def _b64url(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def _principal(claims: object) -> Principal:
    try:
        c = msgspec.convert(claims, _Claims)
    except msgspec.ValidationError:
        raise TokenMalformed from None
    return Principal(int(c.sub), c.role, float(c.exp), c.gen)


def require_role(principal: Principal, *roles: str) -> Principal:
    if principal.role not in roles:
        raise Forbidden(f"requires role: {' or '.join(roles)}")
    return principal


_HASHER = PasswordHasher()


LOGIN: Final = "login"
SIGNUP: Final = "signup"


class PasswordHashing:
    """argon2id off the event loop, at most ``concurrency`` at a time per worker.

    Each hash takes about 64 MiB and a few hundred milliseconds of a core: without a
    bound, a burst of logins is a cheap way to exhaust memory and CPU. Two lanes share the
    slots: registrations (``SIGNUP``) hold at most ``signup_concurrency`` of them (one less
    than all), so logins always keep a share that no burst of registrations can take.
    Each lane has its own queue: up to ``queue`` (``signup_queue``) callers wait for a
    slot; the next one gets 503 RETRY_LATER at once.
    """

    def __init__(
        self,
        concurrency: int = 2,
        queue: int = 32,
        *,
        signup_concurrency: int = 1,
        signup_queue: int = 8,
    ) -> None:
        self._slots = asyncio.Semaphore(concurrency)
        # with one slot in all, registrations cannot be kept off it: they would never run
        self._signup_slots = asyncio.Semaphore(max(1, min(signup_concurrency, concurrency - 1)))
        self._capacity = {LOGIN: concurrency + queue, SIGNUP: signup_concurrency + signup_queue}
        self._inside = {LOGIN: 0, SIGNUP: 0}
        self._dummy: str | None = None
        self.completed = 0  # hashes computed (tests check unknown accounts cost one too)

    def in_progress(self, lane: str = LOGIN) -> int:
        """Callers of ``lane`` hashing or waiting for a slot."""
        return self._inside[lane]

    async def _run(self, fn: Callable[[], _T], *, count: bool = True, lane: str = LOGIN) -> _T:
        if self._inside[lane] >= self._capacity[lane]:
            what = "registrations" if lane == SIGNUP else "logins"
            raise ServiceUnavailable(
                f"too many {what} in progress, retry shortly", headers={"Retry-After": "1"}
            )
        self._inside[lane] += 1
        try:
            async with contextlib.AsyncExitStack() as held:
                if lane == SIGNUP:
                    await held.enter_async_context(self._signup_slots)
                await held.enter_async_context(self._slots)
                result = await asyncio.to_thread(fn)
                self.completed += count
                return result
        finally:
            self._inside[lane] -= 1

    async def hash(self, password: str, *, lane: str = LOGIN) -> str:
        return await self._run(lambda: _HASHER.hash(password), lane=lane)

    async def verify(self, stored_hash: str | None, password: str) -> bool:
        """Check ``password``; with no stored hash (unknown account), check a dummy one.

        The dummy costs the same as a real check, so the answer time does not tell
        whether the account exists.
        """
        if stored_hash is None:
            if self._dummy is None:
                dummy = secrets.token_urlsafe(16)
                self._dummy = await self._run(lambda: _HASHER.hash(dummy), count=False)
            await self._run(lambda: _verify(self._dummy or "", password))
            return False
        return await self._run(lambda: _verify(stored_hash, password))


def _verify(stored_hash: str, password: str) -> bool:
    try:
        return _HASHER.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


# for callers without an app (CLI, demo seeding)
DEFAULT_HASHING: Final = PasswordHashing()


async def hash_password(
    password: str, hashing: PasswordHashing | None = None, *, lane: str = LOGIN
) -> str:
    """argon2id hash, computed off the event loop."""
    return await (hashing or DEFAULT_HASHING).hash(password, lane=lane)


async def check_password(
    stored_hash: str | None, password: str, hashing: PasswordHashing | None = None
) -> bool:
    return await (hashing or DEFAULT_HASHING).verify(stored_hash, password)


def require_metrics_token(authorization: str, token: str | None) -> None:
    """With FLASHSALE_METRICS_TOKEN set, ``/metrics`` (the gateway's and a consumer's) needs
    ``Authorization: Bearer <token>``: Unauthorized otherwise."""
    if token is None:
        return
    scheme, _, given = authorization.partition(" ")
    # bytes that are not UTF-8 arrive as surrogates: compared as the bytes they were
    given_raw = given.encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given_raw, token.encode()):
        raise Unauthorized(
            "metrics need 'Authorization: Bearer <FLASHSALE_METRICS_TOKEN>'",
            headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
        )


__all__ = [
    "PasswordHashing",
    "Principal",
    "TokenService",
    "check_password",
    "hash_password",
    "require_metrics_token",
    "require_role",
]
