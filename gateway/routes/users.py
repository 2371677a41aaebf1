"""Registration, login and the current user."""

from __future__ import annotations

from aiohttp import web

from gateway import appkeys
from gateway.auth import authenticate
from gateway.errors import NotFound, ValidationFailed
from gateway.http import ok, read_json
from gateway.routing import Route
from gateway.services import users
from gateway.services.cart import CART_TOKEN_HEADER, merge_guest_cart
from gateway.validation import Alt, F, Obj, validate

REGISTER = Obj(
    {
        "email": F(str, required=False, nullable=True, max_len=254, pattern=users.EMAIL_RE),
        "phone": F(str, required=False, nullable=True, pattern=users.PHONE_RE),
        "password": F(str, min_len=8, max_len=128),
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


async def register(request: web.Request) -> web.Response:
    body = validate(await read_json(request), REGISTER)
    if not body.get("email") and not body.get("phone"):
        raise ValidationFailed(
            fields={"email": "email or phone is required", "phone": "email or phone is required"}
        )
    user = await users.create_user(
        request.app[appkeys.DB],
        email=body.get("email"),
        phone=body.get("phone"),
        password=body["password"],
        nickname=body["nickname"],
    )
    return ok(user.public(), status=201, message="registered")


async def login(request: web.Request) -> web.Response:
    body = validate(await read_json(request), LOGIN)
    user = await users.login(request.app[appkeys.DB], body["login"], body["password"])
    tokens = request.app[appkeys.TOKENS]
    token = tokens.issue(user.id, user.role)
    await merge_guest_cart(request.app[appkeys.DB], user.id, request.headers.get(CART_TOKEN_HEADER))
    return ok(
        {"token": token, "expires_in": tokens.ttl_s, "token_type": "Bearer", "user": user.public()},
        message="logged in",
    )


async def me(request: web.Request) -> web.Response:
    principal = authenticate(request, request.app[appkeys.TOKENS])
    user = await users.get_user(request.app[appkeys.DB], principal.user_id)
    if user is None:
        raise NotFound("user not found")
    return ok(user.public())


ROUTES = [
    Route(
        "POST",
        "/api/v1/auth/register",
        register,
        "Register with email or phone",
        body=REGISTER,
        responses={201: "registered", 409: "ACCOUNT_EXISTS", 422: "VALIDATION_FAILED"},
        tag="auth",
    ),
    Route(
        "POST",
        "/api/v1/auth/login",
        login,
        "Log in; returns a bearer token",
        body=LOGIN,
        responses={401: "UNKNOWN_USER or WRONG_PASSWORD"},
        tag="auth",
    ),
    Route(
        "GET",
        "/api/v1/users/me",
        me,
        "The current user",
        auth="user",
        responses={401: "AUTH_REQUIRED, TOKEN_EXPIRED, TOKEN_MALFORMED, TOKEN_INVALID"},
        tag="auth",
    ),
]
