"""The caller's principal from an HTTP request: the Bearer token, verified by the core."""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from flashsale.auth import Principal, TokenService
from flashsale.errors import TokenMalformed, Unauthorized


def bearer(request: web.Request) -> str | None:
    return bearer_of(request.headers)


def bearer_of(headers: Mapping[str, str]) -> str | None:
    header = headers.get("Authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise TokenMalformed("Authorization header must be 'Bearer <token>'")
    return token.strip()


def authenticate(request: web.Request, tokens: TokenService) -> Principal:
    """The caller's principal, or 401."""
    return principal_of(request.headers, tokens)


def principal_of(headers: Mapping[str, str], tokens: TokenService) -> Principal:
    """The principal the request's headers carry, or 401."""
    token = bearer_of(headers)
    if token is None:
        raise Unauthorized
    return tokens.verify(token)


def optional_principal(request: web.Request, tokens: TokenService) -> Principal | None:
    """The caller's principal if a token was sent (a bad token is still a 401)."""
    token = bearer(request)
    return None if token is None else tokens.verify(token)
