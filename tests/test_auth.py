from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from flashsale.auth import ROLES, Principal, TokenService, check_password, require_role
from flashsale.errors import AppError, Forbidden, TokenMalformed
from flashsale.settings import Settings
from gateway import appkeys
from gateway.app import create_app
from stack import stackfile
from tests.conftest import TEST_SECRET

pytestmark = pytest.mark.integration


def _email() -> str:
    return f"u{secrets.token_hex(5)}@example.com"


async def _register(client: TestClient[Any, Any], **extra: Any) -> dict[str, Any]:
    payload = {"email": _email(), "password": "correct-horse", "nickname": "Nick", **extra}
    resp = await client.post("/api/v1/auth/register", json=payload)
    assert resp.status == 201, await resp.text()
    return payload


async def test_register_login_me(client: TestClient[Any, Any]) -> None:
    payload = await _register(client)
    resp = await client.post(
        "/api/v1/auth/login", json={"login": payload["email"], "password": "correct-horse"}
    )
    assert resp.status == 200
    data = (await resp.json())["data"]
    assert data["expires_in"] > 0 and data["token"]
    me = await client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {data['token']}"})
    assert me.status == 200
    user = (await me.json())["data"]
    assert user["email"] == payload["email"] and user["role"] == "user"
    assert "password_hash" not in user


async def test_register_by_phone(client: TestClient[Any, Any]) -> None:
    phone = "+86" + str(secrets.randbelow(10**10)).zfill(10)
    resp = await client.post(
        "/api/v1/auth/register", json={"phone": phone, "password": "longenough", "nickname": "P"}
    )
    assert resp.status == 201
    login = await client.post("/api/v1/auth/login", json={"login": phone, "password": "longenough"})
    assert login.status == 200


async def test_duplicate_registration_answers_as_a_new_one(
    client: TestClient[Any, Any], db: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """Registering a taken email says what registering a new one says (no ACCOUNT_EXISTS
    to enumerate accounts with); nothing is written and the owner is told."""
    payload = await _register(client)
    owner = await db.fetchrow("SELECT * FROM users WHERE email = $1", payload["email"])
    assert owner is not None
    fresh = {**payload, "email": _email()}
    answers = []
    with caplog.at_level(logging.INFO, logger="flashsale.notices"):
        for body in ({**payload, "password": "another-horse", "nickname": "Mallory"}, fresh):
            resp = await client.post("/api/v1/auth/register", json=body)
            envelope = await resp.json()
            envelope.pop("request_id", None)
            answers.append((resp.status, set(envelope), set(envelope["data"])))
            assert envelope["data"]["email"] == body["email"]
            assert envelope["message"] == "registered: log in with your password"
    assert answers[0] == answers[1] and answers[0][0] == 201
    notices = [r.getMessage() for r in caplog.records if r.name == "flashsale.notices"]
    assert notices == [
        f"notify user {owner['id']} by email: somebody tried to register a new account with "
        "it (if it was you, log in or reset your password)"
    ]
    again = await db.fetchrow("SELECT * FROM users WHERE email = $1", payload["email"])
    assert again == owner  # the same row: password, nickname, generation untouched
    wrong = {"login": payload["email"], "password": "another-horse"}
    assert (await client.post("/api/v1/auth/login", json=wrong)).status == 401


async def test_register_validation(client: TestClient[Any, Any]) -> None:
    resp = await client.post(
        "/api/v1/auth/register", json={"email": "not-an-email", "password": "short", "nickname": ""}
    )
    assert resp.status == 422
    assert set((await resp.json())["fields"]) == {"email", "password", "nickname"}
    resp = await client.post(
        "/api/v1/auth/register", json={"password": "longenough", "nickname": "x"}
    )
    assert resp.status == 422


async def test_wrong_password_and_unknown_user(client: TestClient[Any, Any]) -> None:
    payload = await _register(client)
    resp = await client.post(
        "/api/v1/auth/login", json={"login": payload["email"], "password": "nope"}
    )
    wrong = await resp.json()
    assert resp.status == 401 and wrong["error"] == "INVALID_CREDENTIALS"
    resp = await client.post("/api/v1/auth/login", json={"login": _email(), "password": "whatever"})
    unknown = await resp.json()
    assert resp.status == 401 and unknown["error"] == "INVALID_CREDENTIALS"
    assert unknown["message"] == wrong["message"]  # nothing tells which accounts exist


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "AUTH_REQUIRED"),
        ("Bearer not.a.jwt", "TOKEN_MALFORMED"),
        ("Basic abc", "TOKEN_MALFORMED"),
        ("forged", "TOKEN_INVALID"),
        ("expired", "TOKEN_EXPIRED"),
    ],
)
async def test_bad_tokens(client: TestClient[Any, Any], header: str | None, code: str) -> None:
    if header == "forged":
        header = "Bearer " + TokenService("another-secret-0123456789-abcdefghijkl", 60).issue(
            1, "admin"
        )
    elif header == "expired":
        now = int(time.time())
        header = "Bearer " + jwt.encode(
            {"sub": "1", "role": "user", "exp": now - 5, "iat": now - 60},
            TEST_SECRET,
            algorithm="HS256",
        )
    headers = {"Authorization": header} if header else {}
    resp = await client.get("/api/v1/users/me", headers=headers)
    assert resp.status == 401
    assert (await resp.json())["error"] == code


def test_roles() -> None:
    admin = Principal(1, "admin", time.time() + 60)
    assert require_role(admin, "admin") is admin
    with pytest.raises(Forbidden):
        require_role(Principal(2, "user", time.time() + 60), "admin", "merchant")


def _cli_user_create(
    settings: Settings, email: str, role: str, password: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "stack",
            "user",
            "create",
            "--role",
            role,
            "--email",
            email,
            "--nickname",
            role.title(),
            "--password",
            password,
        ],
        env={**os.environ, **settings.to_env()},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_cli_user_create(base_settings: Settings) -> None:
    # async like the tests around it: a sync test between async ones made pytest-asyncio
    # finish the session's async fixtures (the database) under it
    email = _email()
    create = functools.partial(_cli_user_create, base_settings, email, "admin", "admin-password")
    result = await asyncio.to_thread(create)
    assert result.returncode == 0, result.stderr
    assert "(admin)" in result.stdout
    again = await asyncio.to_thread(create)
    assert again.returncode == 1 and "ACCOUNT_EXISTS" in again.stderr


def _cli(
    args: list[str], env: dict[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stack", *args],
        env=env,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _without_servers(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
    return {**env, "FLASHSALE_DATA_DIR": str(data_dir)}


async def test_cli_user_create_finds_the_running_stack_and_reads_stdin(
    base_settings: Settings, tmp_path: Path
) -> None:
    # a running `up` (this process) recorded its servers; no FLASHSALE_* URL is set
    stackfile.write(base_settings.with_(data_dir=str(tmp_path)), {})
    email = _email()
    args = ["user", "create", "--role", "admin", "--email", email, "--nickname", "A"]
    created = await asyncio.to_thread(
        _cli, [*args, "--password-stdin"], _without_servers(tmp_path), "piped-password\n"
    )
    assert created.returncode == 0, created.stderr
    assert "(admin)" in created.stdout
    assert f"using the running stack's servers from {tmp_path / 'stack.json'}" in created.stderr

    async def hash_of() -> str:
        conn = await asyncpg.connect(base_settings.database)
        try:
            value: str = await conn.fetchval(
                "SELECT password_hash FROM users WHERE email = $1", email
            )
            return value
        finally:
            await conn.close()

    # the password is the line without its newline
    assert await check_password(await hash_of(), "piped-password")


@pytest.mark.parametrize(
    ("how", "stdin", "code", "line"),
    [
        (
            "no-terminal",
            None,
            2,
            "flashsale: no terminal to ask for the password on: pipe it with --password-stdin",
        ),
        (
            "short",
            "short\n",
            1,
            "flashsale: VALIDATION_FAILED: password must be 8 to 128 characters",
        ),
    ],
)
async def test_cli_user_create_without_a_usable_password_is_one_line(
    base_settings: Settings, tmp_path: Path, how: str, stdin: str | None, code: int, line: str
) -> None:
    email = _email()
    args = ["user", "create", "--email", email, "--nickname", "N"]
    args += ["--password-stdin"] if stdin is not None else []
    env = {**os.environ, **base_settings.to_env()}
    done = await asyncio.to_thread(_cli, args, env, stdin)
    assert done.returncode == code
    assert done.stderr.splitlines() == [line]

    async def count() -> int:
        conn = await asyncpg.connect(base_settings.database)
        try:
            n: int = await conn.fetchval("SELECT count(*) FROM users WHERE email = $1", email)
            return n
        finally:
            await conn.close()

    assert await count() == 0  # nothing was created


async def test_cli_admin_can_log_in(client: TestClient[Any, Any], base_settings: Settings) -> None:
    email = _email()
    created = await asyncio.to_thread(
        _cli_user_create, base_settings, email, "merchant", "merchant-password"
    )
    assert created.returncode == 0, created.stderr
    resp = await client.post(
        "/api/v1/auth/login", json={"login": email, "password": "merchant-password"}
    )
    token = (await resp.json())["data"]["token"]
    me = await client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {token}"})
    assert (await me.json())["data"]["role"] == "merchant"


@pytest.mark.parametrize("junk", ["@@@@", "!!!!", "=", "==", "A"])
async def test_token_signature_has_one_spelling(
    client: TestClient[Any, Any], tokens: TokenService, junk: str
) -> None:
    user_id = 424_242
    token = tokens.issue(user_id, "user")
    assert tokens.verify(token).user_id == user_id
    with pytest.raises(AppError) as caught:
        tokens.verify(token + junk)
    assert caught.value.http_status == 401
    resp = await client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {token}{junk}"})
    assert resp.status == 401


def test_token_signature_last_char_variant_is_refused(tokens: TokenService) -> None:
    """A 43-char signature leaves 2 spare bits: other final letters decode to the same bytes."""
    token = tokens.issue(7, "user")
    head, _, sig = token.rpartition(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    index = alphabet.index(sig[-1])
    twin = alphabet[index ^ 1]  # flips an unused low bit
    with pytest.raises(AppError):
        tokens.verify(f"{head}.{sig[:-1]}{twin}")


def test_token_cache_is_bounded_by_canonical_tokens(tokens: TokenService) -> None:
    service = TokenService(TEST_SECRET, 60)
    token = service.issue(8, "user")
    for junk in ("@", "@@", "!!", "!!!!"):
        with pytest.raises(AppError):
            service.verify(token + junk)
    service.verify(token)
    assert service.cached() == 1


def test_a_full_token_cache_forgets_its_oldest_not_everyone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past its size the cache drops a slice of its oldest entries: the shoppers of the
    moment keep their checked tokens (a full clear made each of them pay the check again)."""
    service = TokenService(TEST_SECRET, 60, cache_size=640)  # forgets 640 // 64 = 10 at once
    tokens = [service.issue(uid, "user") for uid in range(1, 642)]
    for token in tokens:
        service.verify(token)
    assert service.cached() == 631  # 640 held, 10 oldest forgotten, the 641st added
    checks: list[str] = []
    check = service._fast_verify

    def counted(token: str) -> Principal | None:
        checks.append(token)
        return check(token)

    monkeypatch.setattr(service, "_fast_verify", counted)
    for token in tokens[10:]:
        assert service.verify(token).user_id == tokens.index(token) + 1
    assert checks == []  # each of the 631 newest answered from the cache
    service.verify(tokens[0])
    assert checks == [tokens[0]]


def test_the_token_cache_is_sized_by_its_setting(base_settings: Settings) -> None:
    app = create_app(dataclasses.replace(base_settings, token_cache_size=1_000))
    assert app[appkeys.TOKENS].cache_size == 1_000
    assert create_app(base_settings)[appkeys.TOKENS].cache_size == 250_000  # the default


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "\u00b2", "role": "user"},  # a digit to str.isdigit, not to int()
        {"sub": "7", "role": "root"},
        {"sub": 7, "role": "user"},
        {"sub": "7", "role": "user", "gen": True},
        {"sub": "7", "role": "user", "gen": -1},
        {"sub": "7", "role": "user", "exp": True},
    ],
)
def test_a_signed_token_with_claims_of_the_wrong_type_is_malformed(
    claims: dict[str, Any],
) -> None:
    service = TokenService(TEST_SECRET, 60)
    token = jwt.encode({"exp": int(time.time()) + 60, **claims}, TEST_SECRET, algorithm="HS256")
    with pytest.raises(TokenMalformed):
        service.verify(token)


async def test_router_enforces_every_declared_role(
    client: TestClient[Any, Any], app: web.Application, tokens: TokenService
) -> None:
    """Each route with ``auth`` answers 401 without a token (a bad one on an optional
    route) and 403 to every role it does not let in, before its handler runs."""
    from gateway.routing import ROLES_OF, ROUTE_TABLE

    stranger = 2**62  # no such account: nothing a handler did could succeed for it
    checked = 0
    for r in app[ROUTE_TABLE]:
        if r.auth is None:
            continue
        path = "/".join("1" if s.startswith("{") else s for s in r.path.split("/"))
        if r.auth == "optional":
            resp = await client.request(r.method, path, headers={"Authorization": "Bearer x"})
            assert (resp.status, (await resp.json())["error"]) == (401, "TOKEN_MALFORMED"), r
            continue
        resp = await client.request(r.method, path)
        assert (resp.status, (await resp.json())["error"]) == (401, "AUTH_REQUIRED"), r
        roles = ROLES_OF[r.auth]
        for role in ROLES:
            if roles is None or role in roles:
                continue
            headers = {"Authorization": f"Bearer {tokens.issue(stranger, role)}"}
            resp = await client.request(r.method, path, headers=headers, json={"x": 1})
            body = await resp.json()
            assert (resp.status, body["error"]) == (403, "FORBIDDEN"), (r, role, body)
            assert body["message"] == "requires role: " + " or ".join(roles)
            checked += 1
    assert checked >= 40  # the admin, merchant and merchant-only routes, each wrong role
