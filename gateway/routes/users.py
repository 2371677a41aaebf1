"""Registration, login, logout, the current user and account administration."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Literal

from aiohttp import web
from msgspec import UNSET, Meta, UnsetType

from flashsale import users
from flashsale.auth import ROLES, Principal
from flashsale.cart import CART_TOKEN_HEADER, merge_guest_cart
from flashsale.errors import (
    AccountDisabled,
    InvalidCredentials,
    NotFound,
    RateLimited,
    ServiceUnavailable,
)
from gateway import appkeys
from gateway.http import ok
from gateway.routes.flashsales import client_ip
from gateway.routing import Route
from gateway.shapes import Answer, Body, one_of, read_body
from gateway.validation import Alt, path_int

NewPassword = Annotated[
    str, Meta(min_length=users.PASSWORD_MIN_LEN, max_length=users.PASSWORD_MAX_LEN)
]
Password = Annotated[str, Meta(min_length=1, max_length=128)]


class Registration(Body, kw_only=True):
    email: Annotated[str, Meta(max_length=254, pattern=users.EMAIL_RE)] | None = None
    phone: Annotated[str, Meta(pattern=users.PHONE_RE)] | None = None
    password: NewPassword
    nickname: Annotated[str, Meta(min_length=1, max_length=64)]
    alternatives = (Alt(("email",)), Alt(("phone",)))


class Login(Body):
    # an email address or a phone number
    login: Annotated[
        str, Meta(max_length=254, pattern=f"(?:{users.EMAIL_RE})|(?:{users.PHONE_RE})")
    ]
    password: Password


class PasswordChange(Body):
    old_password: Password
    new_password: NewPassword


class AccountChange(Body):
    role: Annotated[str, one_of(ROLES)] | UnsetType = UNSET
    disabled: bool | UnsetType = UNSET
    alternatives = (Alt(("role",)), Alt(("disabled",)))  # at least one of them


class Account(Answer):
    """An account (its token generation stays on the server)."""

    id: int
    email: str | None
    phone: str | None
    nickname: str
    role: Annotated[str, one_of(ROLES)]
    disabled: bool


class SignedIn(Answer):
    token: str
    expires_in: int
    token_type: Literal["Bearer"]
    user: Account


class Registered(Answer):
    """The same for a new and a taken email or phone (registering enumerates nothing)."""

    email: str | None
    phone: str | None
    nickname: str


class LoggedOut(Answer):
    revoked: bool


def _signed_in(request: web.Request, user: users.User, message: str) -> web.Response:
    """A fresh token for ``user``, with the account."""
    tokens = request.app[appkeys.TOKENS]
    token = tokens.issue(user.id, user.role, gen=user.token_gen)
    return ok(
        {"token": token, "expires_in": tokens.ttl_s, "token_type": "Bearer", "user": user.public()},
        message=message,
    )


async def register(request: web.Request) -> web.Response:
    app = request.app
    body = await read_body(request, Registration)  # its alternatives: email or phone
    s = app[appkeys.SETTINGS]
    registered = await users.register(
        app[appkeys.DB],
        app[appkeys.REDIS],
        email=body.email,
        phone=body.phone,
        password=body.password,
        nickname=body.nickname,
        client_ip=client_ip(request),
        limits=users.RegisterLimits(s.register_window_s, s.register_ip_attempts),
        hashing=app[appkeys.PASSWORD_HASHER],
    )
    # the same answer for a new and a taken email or phone (the owner of a taken one is told)
    return ok(registered, status=201, message="registered: log in with your password")


async def login(request: web.Request) -> web.Response:
    app = request.app
    body = await read_body(request, Login)
    s = app[appkeys.SETTINGS]
    user = await users.login(
        app[appkeys.DB],
        app[appkeys.REDIS],
        body.login,
        body.password,
        client_ip=client_ip(request),
        limits=users.LoginLimits(
            s.login_window_s,
            s.login_account_ip_attempts,
            s.login_ip_attempts,
            s.login_account_attempts,
        ),
        hashing=app[appkeys.PASSWORD_HASHER],
    )
    await merge_guest_cart(request.app[appkeys.DB], user.id, request.headers.get(CART_TOKEN_HEADER))
    return _signed_in(request, user, "logged in")


async def me(request: web.Request, principal: Principal) -> web.Response:
    user = await users.get_user(request.app[appkeys.DB], principal.user_id)
    if user is None:
        raise NotFound("user not found")
    return ok(user.public())


async def logout(request: web.Request, principal: Principal) -> web.Response:
    """Revoke every token of the caller (all devices)."""
    await users.logout(request.app[appkeys.DB], request.app[appkeys.REDIS], principal.user_id)
    return ok({"revoked": True}, message="logged out")


async def change_password(request: web.Request, principal: Principal) -> web.Response:
    body = await read_body(request, PasswordChange)
    user = await users.change_password(
        request.app[appkeys.DB],
        request.app[appkeys.REDIS],
        principal.user_id,
        body.old_password,
        body.new_password,
        request.app[appkeys.PASSWORD_HASHER],
    )
    return _signed_in(request, user, "password changed; other sessions are logged out")


async def admin_patch(request: web.Request, principal: Principal) -> web.Response:
    user_id = path_int(request.match_info["user_id"], "user")
    body = await read_body(request, AccountChange)  # its alternatives: role and/or disabled
    db, redis = request.app[appkeys.DB], request.app[appkeys.REDIS]
    user = None
    if body.role is not UNSET:
        user = await users.set_role(db, redis, user_id, body.role)
    if body.disabled is not UNSET:
        user = await users.set_disabled(db, redis, user_id, body.disabled)
    assert user is not None
    return ok(user.public(), message="account updated; its tokens are revoked")


async def admin_delete(request: web.Request, principal: Principal) -> web.Response:
    """Delete an account: disabled for good (its orders keep their owner), tokens revoked."""
    user_id = path_int(request.match_info["user_id"], "user")
    user = await users.set_disabled(
        request.app[appkeys.DB], request.app[appkeys.REDIS], user_id, True
    )
    return ok(user.public(), message="account disabled; its tokens are revoked")


route = partial(Route, tag="auth")
ROUTES = [
    route(
        "POST",
        "/api/v1/auth/register",
        register,
        "Register with email or phone",
        body=Registration,
        success={
            201: "registered (the same answer when the email or phone is taken: its owner "
            "is notified, nothing is written)"
        },
        responses=(RateLimited, ServiceUnavailable),
        answer=Registered,
    ),
    route(
        "POST",
        "/api/v1/auth/login",
        login,
        "Log in; returns a bearer token",
        body=Login,
        responses=(InvalidCredentials, AccountDisabled, RateLimited, ServiceUnavailable),
        answer=SignedIn,
    ),
    route(
        "GET",
        "/api/v1/users/me",
        me,
        "The current user",
        auth="user",
        answer=Account,
    ),
    route(
        "POST",
        "/api/v1/auth/logout",
        logout,
        "Log out everywhere: every token of the account is revoked",
        auth="user",
        responses=(ServiceUnavailable,),
        answer=LoggedOut,
    ),
    route(
        "PUT",
        "/api/v1/users/me/password",
        change_password,
        "Change the password; other tokens are revoked, a new one is returned",
        auth="user",
        body=PasswordChange,
        responses=(InvalidCredentials,),
        answer=SignedIn,
    ),
    route(
        "PATCH",
        "/api/v1/admin/users/{user_id}",
        admin_patch,
        "Change an account's role or disable it; its tokens are revoked",
        auth="admin",
        body=AccountChange,
        responses=(ServiceUnavailable,),
        answer=Account,
    ),
    route(
        "DELETE",
        "/api/v1/admin/users/{user_id}",
        admin_delete,
        "Delete (disable) an account; its tokens are revoked",
        auth="admin",
        responses=(ServiceUnavailable,),
        answer=Account,
    ),
]
