"""Running the gateway: one worker in this process, or N worker processes on one port."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web

from flashsale.settings import Settings
from flashsale.timing import CRASH_LOOP_WINDOW_S, RESTART_BACKOFF_S
from gateway import accesslog
from gateway.accesslog import JsonAccessLogger
from gateway.app import create_app
from gateway.fastjoin import GatewayRunner
from stack.embedded import die_with_parent
from stack.listen import AcceptAllSite

log = logging.getLogger(__name__)


def configure_logging(settings: Settings) -> None:
    from stack import logs

    logs.configure(settings.log_level)
    logging.getLogger("gateway.access").setLevel(
        logging.INFO if settings.access_log else logging.WARNING
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


def run_loop(main: Callable[[], object]) -> None:
    """Run a coroutine function on uvloop."""
    import uvloop

    uvloop.run(main())  # type: ignore[arg-type]


# The kernel caps a listen queue at net.core.somaxconn: asking for the most it allows
# means the host's setting alone decides how many handshakes a stampede may queue
# (docs/operations.md, "A host for a stampede").
LISTEN_BACKLOG: Final = 65_535


async def run_until_signalled(
    app: web.Application,
    host: str,
    port: int,
    *,
    access_log: logging.Logger | None = None,
    stop: asyncio.Event | None = None,
    freeze_gc: bool = False,
    runner_class: type[web.AppRunner] = web.AppRunner,
) -> None:
    """Serve ``app`` on ``host:port`` with SO_REUSEPORT (siblings share the port) until
    SIGTERM/SIGINT or ``stop``; the gateway, the HTTP ceiling and the naive peer all run
    through here, so the benchmark compares like with like."""
    runner = runner_class(
        app, handle_signals=False, access_log_class=JsonAccessLogger, access_log=access_log
    )
    await runner.setup()
    site = AcceptAllSite(runner, host, port, backlog=LISTEN_BACKLOG)
    await site.start()
    log.info("worker %d listening on %s:%d", os.getpid(), host, port)
    if freeze_gc:
        # Everything built at start-up lives as long as the worker: move it out of the
        # collector's sight, and collect the young generation less often, so that a
        # stampede's allocations do not buy long full-collection pauses (tail latency).
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 50, 100)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("worker %d stopping", os.getpid())
        await runner.cleanup()
        accesslog.STDERR.flush()


def raise_open_files() -> int:
    """Raise this process's soft limit on open files to its hard limit and return it: a
    worker holds one descriptor per shopper's connection, and a default soft limit of
    1,024 would refuse the 1,025th shopper of a stampede (EMFILE) on a host whose hard
    limit allows far more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):  # e.g. above the kernel's nr_open
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


async def serve_worker(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """One gateway worker."""
    log.info("worker %d may hold %d open files", os.getpid(), raise_open_files())
    await run_until_signalled(
        create_app(settings),
        settings.http_host,
        settings.http_port,
        access_log=logging.getLogger("gateway.access") if settings.access_log else None,
        stop=stop,
        freeze_gc=True,
        runner_class=GatewayRunner if settings.join_fast_path else web.AppRunner,
    )


def spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A child that dies with us (PR_SET_PDEATHSIG) and ignores the terminal's Ctrl-C."""
    return subprocess.Popen(
        args,
        env=env,
        preexec_fn=die_with_parent(signal.SIGTERM),
    )


def child_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
    env.update(settings.to_env())
    return env


def stop_children(children: list[subprocess.Popen[bytes]], timeout_s: float = 20.0) -> None:
    for child in children:
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("pid %d did not stop in time; killing it", child.pid)
            child.kill()
            child.wait()


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived while a StopFlag was interrupting.

    A BaseException, as KeyboardInterrupt is: raised wherever the main thread happens to be,
    it must not be taken for an error by the start's own ``except Exception`` (a probe that
    retries a server until it answers would swallow it and carry on starting)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)


class StopFlag:
    """Set by SIGTERM/SIGINT; a supervisor loop polls it.

    With ``interrupt=True`` the first signal also raises :class:`Stopped` wherever the main
    thread is (a start-up that must not be waited out), until :meth:`settle`.
    """

    def __init__(self, *, interrupt: bool = False) -> None:
        self.signum: int | None = None
        self._interrupt = interrupt
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def settle(self) -> None:
        """From now on a signal only sets the flag; :class:`Stopped` if one came already (its
        raise can still be lost: Python only prints an exception raised inside a finalizer)."""
        self._interrupt = False
        if self.signum is not None:
            raise Stopped(self.signum)

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum
        if self._interrupt:
            self._interrupt = False  # the stop that follows is not interrupted again
            raise Stopped(signum)

    def __bool__(self) -> bool:
        return self.signum is not None


def serve_multi(settings: Settings) -> int:
    """``flashsale serve``: one worker in-process, or N worker processes sharing the port."""
    from stack.preflight import PreflightFailed, check_reachable, claim_port

    try:
        port = claim_port(settings.http_host, settings.http_port)
        check_reachable(settings)
    except PreflightFailed as exc:
        print(f"flashsale: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        if settings.workers == 1:
            run_loop(lambda: serve_worker(settings))
            return 0
        ensure_multiproc_dir(os.path.join(settings.data_dir, "metrics"))
        env = child_env(settings)
        env["PROMETHEUS_MULTIPROC_DIR"] = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        return supervise([sys.executable, "-m", "stack", "worker"], env, settings.workers)
    finally:
        port.close()


CRASH_LOOP_DEATHS: Final = 5  # this many deaths of one child within CRASH_LOOP_WINDOW_S


class CrashLoop(Exception):
    """A supervised process keeps dying: restarting it again would only hide why."""


@dataclass
class Supervised:
    """A child the supervisor keeps running: crash-only, restarted with a backoff."""

    name: str
    start: Callable[[], subprocess.Popen[bytes]]
    proc: subprocess.Popen[bytes] | None = None
    deaths: collections.deque[float] = field(default_factory=collections.deque)
    restart_at: float | None = None

    def __post_init__(self) -> None:
        if self.proc is None:
            self.proc = self.start()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def check(self, now: float) -> None:
        """Notice a death (schedule the restart) or restart when its backoff is over."""
        assert self.proc is not None
        if self.restart_at is None:
            code = self.proc.poll()
            if code is None:
                return
            while self.deaths and now - self.deaths[0] > CRASH_LOOP_WINDOW_S:
                self.deaths.popleft()
            self.deaths.append(now)
            if len(self.deaths) >= CRASH_LOOP_DEATHS:
                raise CrashLoop(
                    f"{self.name} exited {len(self.deaths)} times in "
                    f"{CRASH_LOOP_WINDOW_S:.0f}s (last exit code {code}); stopping"
                )
            delay = RESTART_BACKOFF_S[min(len(self.deaths), len(RESTART_BACKOFF_S)) - 1]
            log.error(
                "%s (pid %d) exited with %s; restarting it in %.1fs",
                self.name,
                self.proc.pid,
                code,
                delay,
            )
            self.restart_at = now + delay
        elif now >= self.restart_at:
            self.restart_at = None
            self.proc = self.start()
            log.warning("%s restarted as pid %d", self.name, self.proc.pid)


def keep_alive(children: list[Supervised]) -> None:
    """One supervision pass over ``children``; raises CrashLoop."""
    now = time.monotonic()
    for child in children:
        child.check(now)


def processes(children: list[Supervised]) -> list[subprocess.Popen[bytes]]:
    return [c.proc for c in children if c.proc is not None]


def supervise(args: list[str], env: dict[str, str], count: int) -> int:
    """Run ``count`` copies of ``args``; a copy that dies is restarted (crash-only), so one
    crash never takes its siblings down. Stops them all on SIGTERM/SIGINT (0), or when one
    crash-loops (1, with one line saying which)."""
    flag = StopFlag()
    children = [Supervised(f"worker {i + 1}", lambda: spawn(args, env)) for i in range(count)]
    try:
        while not flag:
            keep_alive(children)
            time.sleep(0.2)
    except CrashLoop as exc:
        print(f"flashsale: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        stop_children(processes(children))
    return 0


def ensure_multiproc_dir(path: str) -> None:
    """A fresh PROMETHEUS_MULTIPROC_DIR shared by this process and its children."""
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.unlink(os.path.join(path, name))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.abspath(path)
