"""Registration, login, logout, the current user and account administration."""

from __future__ import annotations

from aiohttp import web

from flashsale import users
from flashsale.auth import ROLES, Principal
from flashsale.cart import CART_TOKEN_HEADER, merge_guest_cart
from flashsale.errors import (
    AccountDisabled,
    InvalidCredentials,
    NotFound,
    RateLimited,
    ServiceUnavailable,
    ValidationFailed,
)
from gateway import appkeys
from gateway.http import ok, read_json
from gateway.routes.flashsales import client_ip
from gateway.routing import Route
from gateway.validation import Alt, F, Obj, path_int, validate

REGISTER = Obj(
    {
        "email": F(str, required=False, nullable=True, max_len=254, pattern=users.EMAIL_RE),
        "phone": F(str, required=False, nullable=True, pattern=users.PHONE_RE),
        "password": F(str, min_len=users.PASSWORD_MIN_LEN, max_len=users.PASSWORD_MAX_LEN),
        "nickname": F(str, min_len=1, max_len=64),
    },
    alts=(Alt(("email",)), Alt(("phone",))),
)
LOGIN = {
    "login": F(
        str, max_len=254, pattern=f"(?:{users.EMAIL_RE})|(?:{users.PHONE_RE})"
    ),  # an email address or a phone number
    "password": F(str, min_len=1, max_len=128),
}
CHANGE_PASSWORD = {
    "old_password": F(str, min_len=1, max_len=128),
    "new_password": F(str, min_len=users.PASSWORD_MIN_LEN, max_len=users.PASSWORD_MAX_LEN),
}
ADMIN_PATCH = Obj(
    {
        "role": F(str, required=False, choices=ROLES),
        "disabled": F(bool, required=False),
    },
    alts=(Alt(("role",)), Alt(("disabled",))),  # at least one of them
)


async def register(request: web.Request) -> web.Response:
    app = request.app
    body = validate(await read_json(request), REGISTER)
    if not body.get("email") and not body.get("phone"):
        raise ValidationFailed(
            fields={"email": "email or phone is required", "phone": "email or phone is required"}
        )
    s = app[appkeys.SETTINGS]
    registered = await users.register(
        app[appkeys.DB],
        app[appkeys.REDIS],
        email=body.get("email"),
        phone=body.get("phone"),
        password=body["password"],
        nickname=body["nickname"],
        client_ip=client_ip(request),
        limits=users.RegisterLimits(s.register_window_s, s.register_ip_attempts),
        hashing=app[appkeys.PASSWORD_HASHER],
    )
    # the same answer for a new and a taken email or phone (the owner of a taken one is told)
    return ok(registered, status=201, message="registered: log in with your password")


async def login(request: web.Request) -> web.Response:
    app = request.app
    body = validate(await read_json(request), LOGIN)
    s = app[appkeys.SETTINGS]
    user = await users.login(
        app[appkeys.DB],
        app[appkeys.REDIS],
        body["login"],
        body["password"],
        client_ip=client_ip(request),
        limits=users.LoginLimits(
            s.login_window_s,
            s.login_account_ip_attempts,
            s.login_ip_attempts,
            s.login_account_attempts,
        ),
        hashing=app[appkeys.PASSWORD_HASHER],
    )
    tokens = request.app[appkeys.TOKENS]
    token = tokens.issue(user.id, user.role, gen=user.token_gen)
    await merge_guest_cart(request.app[appkeys.DB], user.id, request.headers.get(CART_TOKEN_HEADER))
    return ok(
        {"token": token, "expires_in": tokens.ttl_s, "token_type": "Bearer", "user": user.public()},
        message="logged in",
    )


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
    body = validate(await read_json(request), CHANGE_PASSWORD)
    user = await users.change_password(
        request.app[appkeys.DB],
        request.app[appkeys.REDIS],
        principal.user_id,
        body["old_password"],
        body["new_password"],
        request.app[appkeys.PASSWORD_HASHER],
    )
    tokens = request.app[appkeys.TOKENS]
    token = tokens.issue(user.id, user.role, gen=user.token_gen)
    return ok(
        {"token": token, "expires_in": tokens.ttl_s, "token_type": "Bearer", "user": user.public()},
        message="password changed; other sessions are logged out",
    )


async def admin_patch(request: web.Request, principal: Principal) -> web.Response:
    user_id = path_int(request.match_info["user_id"], "user")
    body = validate(await read_json(request), ADMIN_PATCH)
    if body.get("role") is None and body.get("disabled") is None:
        raise ValidationFailed(fields={"role": "give role and/or disabled"})
    db, redis = request.app[appkeys.DB], request.app[appkeys.REDIS]
    user = None
    if body.get("role") is not None:
        user = await users.set_role(db, redis, user_id, body["role"])
    if body.get("disabled") is not None:
        user = await users.set_disabled(db, redis, user_id, body["disabled"])
    assert user is not None
    return ok(user.public(), message="account updated; its tokens are revoked")


async def admin_delete(request: web.Request, principal: Principal) -> web.Response:
    """Delete an account: disabled for good (its orders keep their owner), tokens revoked."""
    user_id = path_int(request.match_info["user_id"], "user")
    user = await users.set_disabled(
        request.app[appkeys.DB], request.app[appkeys.REDIS], user_id, True
    )
    return ok(user.public(), message="account disabled; its tokens are revoked")


ROUTES = [
    Route(
        "POST",
        "/api/v1/auth/register",
        register,
        "Register with email or phone",
        body=REGISTER,
        success={
            201: "registered (the same answer when the email or phone is taken: its owner "
            "is notified, nothing is written)"
        },
        responses=(ValidationFailed, RateLimited, ServiceUnavailable),
        tag="auth",
    ),
    Route(
        "POST",
        "/api/v1/auth/login",
        login,
        "Log in; returns a bearer token",
        body=LOGIN,
        responses=(InvalidCredentials, AccountDisabled, RateLimited, ServiceUnavailable),
        tag="auth",
    ),
    Route(
        "GET",
        "/api/v1/users/me",
        me,
        "The current user",
        auth="user",
        tag="auth",
    ),
    Route(
        "POST",
        "/api/v1/auth/logout",
        logout,
        "Log out everywhere: every token of the account is revoked",
        auth="user",
        responses=(ServiceUnavailable,),
        tag="auth",
    ),
    Route(
        "PUT",
        "/api/v1/users/me/password",
        change_password,
        "Change the password; other tokens are revoked, a new one is returned",
        auth="user",
        body=CHANGE_PASSWORD,
        responses=(InvalidCredentials, ValidationFailed),
        tag="auth",
    ),
    Route(
        "PATCH",
        "/api/v1/admin/users/{user_id}",
        admin_patch,
        "Change an account's role or disable it; its tokens are revoked",
        auth="admin",
        body=ADMIN_PATCH,
        responses=(NotFound, ValidationFailed, ServiceUnavailable),
        tag="auth",
    ),
    Route(
        "DELETE",
        "/api/v1/admin/users/{user_id}",
        admin_delete,
        "Delete (disable) an account; its tokens are revoked",
        auth="admin",
        responses=(NotFound, ServiceUnavailable),
        tag="auth",
    ),
]
