"""The ``flashsale`` command."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import subprocess
import sys
from pathlib import Path

from redis.asyncio import Redis

from flashsale.settings import Settings, SettingsError, unknown_variables
from flashsale.stores.redisclient import open_redis

log = logging.getLogger("flashsale")


def _password_options(command: argparse.ArgumentParser) -> None:
    given = command.add_mutually_exclusive_group()
    given.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input (for scripts)",
    )
    given.add_argument(
        "--password", help="the password (visible to other users: prefer --password-stdin)"
    )


class _NoPassword(Exception):
    """No password given and no terminal to ask on."""


def _read_password(args: argparse.Namespace) -> str:
    """The new password: given, piped with --password-stdin, or asked on the terminal."""
    from flashsale.users import check_new_password

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif args.password is not None:
        password = args.password
    elif sys.stdin.isatty():
        try:
            password = getpass.getpass("password: ")
        except EOFError:  # Ctrl-D at the prompt
            raise _NoPassword("no password given") from None
    else:
        raise _NoPassword("no terminal to ask for the password on: pipe it with --password-stdin")
    check_new_password(password)
    return password


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashsale", description="Flash-sale and inventory gateway")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start everything (embedded servers when no URLs are set)")
    up.add_argument("--no-demo", action="store_true", help="skip the demo catalog and accounts")
    up.add_argument(
        "--redis-shards",
        type=int,
        default=0,
        metavar="N",
        help="start a local valkey cluster of N primaries (one replica each) instead of one "
        "valkey (when FLASHSALE_REDIS_URL is unset)",
    )
    sub.add_parser("serve", help="run the gateway workers against external services")
    sub.add_parser("worker", help="one gateway worker process (used by serve and up)")
    sub.add_parser("consume", help="run the order consumers and sweepers")
    sub.add_parser("migrate", help="apply pending database migrations")
    user = sub.add_parser("user", help="manage accounts")
    user_sub = user.add_subparsers(dest="user_command", required=True)
    create = user_sub.add_parser("create", help="create an account")
    create.add_argument("--email")
    create.add_argument("--phone")
    create.add_argument("--nickname", required=True)
    create.add_argument("--role", choices=["user", "merchant", "admin"], default="user")
    _password_options(create)
    # these revoke every token of the account (they need the Redis the gateway uses)
    set_role = user_sub.add_parser("set-role", help="change an account's role (revokes tokens)")
    set_role.add_argument("--id", type=int, required=True)
    set_role.add_argument("--role", choices=["user", "merchant", "admin"], required=True)
    set_pw = user_sub.add_parser("set-password", help="set a password (revokes tokens)")
    set_pw.add_argument("--id", type=int, required=True)
    _password_options(set_pw)
    for name, text in (
        ("disable", "disable (delete) an account and revoke its tokens"),
        ("enable", "enable a disabled account"),
        ("logout", "revoke every token of an account"),
    ):
        user_sub.add_parser(name, help=text).add_argument("--id", type=int, required=True)
    rec = sub.add_parser(
        "reconcile",
        help="compare Redis with PostgreSQL for recent sales (running, or ended in the last "
        "7 days), then check that payments, refunds, shipping and returns add up; exit 1 on "
        "any drift",
    )
    rec.add_argument("--repair", action="store_true", help="fix Redis from PostgreSQL")
    sub.add_parser("rebuild-cache", help="rebuild Redis sale state from PostgreSQL")
    sub.add_parser(
        "clean",
        help="remove the data folder and what the stack kept for it elsewhere (PostgreSQL's "
        "data under /var/lib/flashsale for a private folder); refused while `up` runs",
    )
    plan = sub.add_parser(
        "plan", help="switch a contingency plan (docs/plans.md) on every worker of every host"
    )
    plan.add_argument("action", choices=("on", "off", "arm", "status"))
    plan.add_argument("name", nargs="?", help="the plan (omit with status: every plan)")
    plan.add_argument("--reason", default="", help="why: written to the operation log")
    plan.add_argument("--reads", action="store_true", help="shed-storefront: shed reads too")
    plan.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    plan.add_argument("--sale", type=int, metavar="ID", help="queue-sale: the sale to move")
    cap = sub.add_parser(
        "capacity",
        help="the hardware a sale needs, per tier, from the costs flashsale bench measured",
    )
    cap.add_argument("--peak-joins", type=float, required=True, metavar="N")
    cap.add_argument("--storefront-rps", type=float, default=0.0, metavar="M")
    cap.add_argument("--from", dest="source", default="bench-results.json", metavar="BENCH.json")
    cap.add_argument("--target", type=float, default=0.7, help="utilisation of each unit")
    cap.add_argument("--storefront-gateway-us", type=float, help="when the bench has no row")
    cap.add_argument("--storefront-postgres-us", type=float, help="when the bench has no row")
    cap.add_argument("--write", metavar="FILE", help="also write it into FILE (CAPACITY.md)")
    bench = sub.add_parser("bench", help="run the side-by-side benchmark")
    bench.add_argument("--quick", action="store_true", help="a short run (~10 minutes on 2 cores)")
    bench.add_argument("--out", default="bench-results.json")
    bench.add_argument(
        "--redis-fsync",
        choices=("always", "everysec", "off"),
        default="always",
        help="Redis AOF fsync policy for the run (always: the production setting)",
    )
    return p


async def _migrate(settings: Settings) -> int:
    from flashsale.stores.db import create_pool, migrate

    pool = await create_pool(settings.database, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            applied = await migrate(conn)
    finally:
        await pool.close()
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""))
    return 0


async def _user_create(settings: Settings, args: argparse.Namespace) -> int:
    from flashsale.stores.db import create_pool
    from flashsale.users import create_user

    password = _read_password(args)
    pool = await create_pool(settings.database, min_size=1, max_size=1)
    try:
        user = await create_user(
            pool,
            email=args.email,
            phone=args.phone,
            password=password,
            nickname=args.nickname,
            role=args.role,
        )
    finally:
        await pool.close()
    print(f"created user {user.id} ({user.role})")
    return 0


async def _user_change(settings: Settings, args: argparse.Namespace) -> int:

    from flashsale import users
    from flashsale.stores.db import create_pool

    password = ""
    if args.user_command == "set-password":
        password = _read_password(args)
    pool = await create_pool(settings.database, min_size=1, max_size=1)
    redis: Redis = open_redis(settings)
    try:
        cmd = args.user_command
        if cmd == "set-role":
            user = await users.set_role(pool, redis, args.id, args.role)
        elif cmd == "set-password":
            user = await users.set_password(pool, redis, args.id, password)
        elif cmd in ("disable", "enable"):
            user = await users.set_disabled(pool, redis, args.id, cmd == "disable")
        else:
            user = await users.logout(pool, redis, args.id)
    finally:
        await redis.aclose()
        await pool.close()
    state = "disabled" if user.disabled else "enabled"
    print(f"user {user.id} ({user.role}, {state}): tokens revoked")
    return 0


def _clean(data_dir: Path) -> int:
    from stack.clean import CleanRefused, clean

    try:
        removed = clean(data_dir)
    except CleanRefused as exc:
        print(f"flashsale: {exc}", file=sys.stderr)
        return 2
    for path in removed:
        print(f"removed {path}")
    if not removed:
        print(f"nothing to remove: {data_dir.resolve()} does not exist")
    return 0


_PLAN_MODES = {"on": "on", "off": "off", "arm": "armed"}


def _confirm_plan(args: argparse.Namespace) -> bool:
    """A flip is a decision: say what the plan does and have its name typed back."""
    from flashsale import plans

    if args.yes or args.action == "status" or args.name is None:
        return True
    plan = plans.plan_named(args.name)
    print(f"{plan.name}: {plan.does}\nclosing: {plan.closing}")
    typed = input(f"switch {plan.name} {_PLAN_MODES[args.action]} everywhere? type its name: ")
    return typed.strip() == plan.name


async def _plan(settings: Settings, args: argparse.Namespace) -> int:
    import orjson

    from flashsale import plans

    redis = open_redis(settings)
    try:
        if args.action == "status":
            switches = plans.Switches()
            await switches.refresh(redis)
            shown = [p for p in switches.public() if args.name in (None, p["name"])]
            log_rows = await plans.operation_log(redis, count=20)
            print(
                orjson.dumps({"plans": shown, "log": log_rows}, option=orjson.OPT_INDENT_2).decode()
            )
            return 0
        if args.name is None:
            print("flashsale: plan on|off|arm needs the plan's name", file=sys.stderr)
            return 2
        plan = plans.plan_named(args.name)
        mode = _PLAN_MODES[args.action]
        by = f"cli:{getpass.getuser()}"
        if plan.name == plans.QUEUE_SALE:
            return await _queue_sale(settings, redis, args, by)
        moved = await plans.switch(
            redis,
            plan.name,
            mode,
            by=by,
            reason=args.reason,
            options={"reads": True} if args.reads else None,
        )
        print(f"{plan.name}: {mode}" + ("" if moved else " (unchanged)"))
        return 0
    finally:
        await redis.aclose()


async def _queue_sale(settings: Settings, redis: Redis, args: argparse.Namespace, by: str) -> int:
    from flashsale import plans
    from flashsale.stores.db import create_pool
    from flashsale.stores.scripts import FlashScripts

    if args.sale is None or args.action == "arm":
        print("flashsale: plan on|off queue-sale --sale ID", file=sys.stderr)
        return 2
    settings.require("database_url")
    pool = await create_pool(settings.database, min_size=1, max_size=1)
    try:
        moved = await plans.queue_sale(
            pool,
            redis,
            FlashScripts.register(redis),
            args.sale,
            queued=args.action == "on",
            by=by,
            reason=args.reason,
        )
    finally:
        await pool.close()
    print(
        f"queue-sale: sale {args.sale} "
        + ("queued" if args.action == "on" else "open")
        + ("" if moved else " (unchanged)")
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        for line in unknown_variables():
            print(f"flashsale: warning: {line}", file=sys.stderr)
        from stack.processes import configure_logging

        configure_logging(settings)
        return _dispatch(settings, args)
    except SettingsError as exc:
        print(f"flashsale: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(settings: Settings, args: argparse.Namespace) -> int:
    from flashsale.errors import AppError

    cmd = args.command
    if cmd == "up":
        from stack.up import up

        return up(settings, demo=not args.no_demo, redis_shards=args.redis_shards)
    if cmd == "serve":
        from stack.processes import serve_multi

        settings.require("redis_url", "database_url", "kafka_bootstrap", "secret_key")
        return serve_multi(settings)
    if cmd == "worker":
        from stack.processes import run_loop, serve_worker

        run_loop(lambda: serve_worker(settings))
        return 0
    if cmd == "consume":
        from consumers.runner import run_consumers
        from stack.processes import run_loop

        settings.require("redis_url", "database_url", "kafka_bootstrap")
        run_loop(lambda: run_consumers(settings))
        return 0
    if cmd == "migrate":
        settings.require("database_url")
        return asyncio.run(_migrate(settings))
    if cmd == "user":
        from stack import stackfile

        settings = stackfile.fill(settings)
        settings.require("database_url")
        try:
            if args.user_command == "create":
                return asyncio.run(_user_create(settings, args))
            settings.require("redis_url")
            return asyncio.run(_user_change(settings, args))
        except AppError as exc:
            print(f"flashsale: {exc.code}: {exc.message}", file=sys.stderr)
            return 1
        except _NoPassword as exc:
            print(f"flashsale: {exc}", file=sys.stderr)
            return 2
    if cmd == "plan":
        from stack import stackfile

        settings = stackfile.fill(settings)
        settings.require("redis_url")
        try:
            if not _confirm_plan(args):
                print("not switched")
                return 1
            return asyncio.run(_plan(settings, args))
        except AppError as exc:
            print(f"flashsale: {exc.code}: {exc.message}", file=sys.stderr)
            return 1
    if cmd == "capacity":
        from stack.capacity import CapacityError
        from stack.capacity import main as capacity

        if not 0 < args.target <= 1 or args.peak_joins < 0 or args.storefront_rps < 0:
            print("flashsale: --target is in (0, 1]; loads are >= 0", file=sys.stderr)
            return 2
        try:
            print(
                capacity(
                    source=args.source,
                    peak_joins=args.peak_joins,
                    storefront_rps=args.storefront_rps,
                    target=args.target,
                    storefront_gateway_us=args.storefront_gateway_us,
                    storefront_postgres_us=args.storefront_postgres_us,
                    write=args.write,
                ),
                end="",
            )
        except CapacityError as exc:
            print(f"flashsale: capacity: {exc}", file=sys.stderr)
            return 1
        return 0
    if cmd in ("reconcile", "rebuild-cache"):
        from consumers.reconcile import main as reconcile_main
        from stack import stackfile

        settings = stackfile.fill(settings)
        settings.require("redis_url", "database_url")
        return reconcile_main(settings, command=cmd, repair=getattr(args, "repair", False))
    if cmd == "clean":
        return _clean(Path(settings.data_dir))
    if cmd == "bench":
        # the load tests sit above the stack (they start it): run them as a program, as a
        # user would, rather than import them
        bench = [sys.executable, "-m", "loadtests.bench", "--out", args.out]
        bench += ["--redis-fsync", args.redis_fsync, *(["--quick"] if args.quick else [])]
        return subprocess.call(bench)  # noqa: S603 - our own interpreter and module
    raise AssertionError(cmd)


if __name__ == "__main__":
    sys.exit(main())
