"""Running the gateway: one worker in this process, or N worker processes on one port."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from aiohttp import web

from gateway.app import create_app
from gateway.embedded import _die_with_parent
from gateway.middlewares import JsonAccessLogger
from gateway.settings import Settings

log = logging.getLogger(__name__)


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("gateway.access").setLevel(
        logging.INFO if settings.access_log else logging.WARNING
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


def run_loop(main: Callable[[], object]) -> None:
    """Run a coroutine function on uvloop."""
    import uvloop

    uvloop.run(main())  # type: ignore[arg-type]


async def run_until_signalled(
    app: web.Application,
    host: str,
    port: int,
    *,
    access_log: logging.Logger | None = None,
    stop: asyncio.Event | None = None,
    freeze_gc: bool = False,
) -> None:
    """Serve ``app`` on ``host:port`` with SO_REUSEPORT (siblings share the port) until
    SIGTERM/SIGINT or ``stop``; the gateway, the HTTP ceiling and the naive peer all run
    through here, so the benchmark compares like with like."""
    runner = web.AppRunner(
        app, handle_signals=False, access_log_class=JsonAccessLogger, access_log=access_log
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=True, backlog=4096)
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


async def serve_worker(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """One gateway worker."""
    await run_until_signalled(
        create_app(settings),
        settings.http_host,
        settings.http_port,
        access_log=logging.getLogger("gateway.access") if settings.access_log else None,
        stop=stop,
        freeze_gc=True,
    )


def spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A child that dies with us (PR_SET_PDEATHSIG) and ignores the terminal's Ctrl-C."""
    return subprocess.Popen(
        args,
        env=env,
        preexec_fn=_die_with_parent(signal.SIGTERM),
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


class StopFlag:
    """Set by SIGTERM/SIGINT; a supervisor loop polls it."""

    def __init__(self) -> None:
        self.signum: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum

    def __bool__(self) -> bool:
        return self.signum is not None


def serve_multi(settings: Settings) -> int:
    """``flashsale serve``: one worker in-process, or N worker processes sharing the port."""
    if settings.workers == 1:
        run_loop(lambda: serve_worker(settings))
        return 0
    ensure_multiproc_dir(os.path.join(settings.data_dir, "metrics"))
    env = child_env(settings)
    env["PROMETHEUS_MULTIPROC_DIR"] = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    return supervise([sys.executable, "-m", "gateway", "worker"], env, settings.workers)


def supervise(args: list[str], env: dict[str, str], count: int) -> int:
    """Run ``count`` copies of ``args``; stop them all on SIGTERM/SIGINT (0) or as soon as
    one of them exits (1)."""
    flag = StopFlag()
    children = [spawn(args, env) for _ in range(count)]
    try:
        while not flag:
            for child in children:
                if child.poll() is not None:
                    log.error("worker %d exited with %s; stopping", child.pid, child.returncode)
                    return 1
            time.sleep(0.2)
    finally:
        stop_children(children)
    return 0


def ensure_multiproc_dir(path: str) -> None:
    """A fresh PROMETHEUS_MULTIPROC_DIR shared by this process and its children."""
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.unlink(os.path.join(path, name))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.abspath(path)
