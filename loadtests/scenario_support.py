"""Plain helpers the Locust scenarios share: tokens, settings, outcome files.

Kept free of Locust and gevent imports so that tests can import it (gevent's
monkey-patching must never run inside pytest).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any, TextIO

import orjson


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def env_float(name: str, default: float) -> float:
    raw = env_str(name)
    return float(raw) if raw else default


def env_int(name: str, default: int) -> int:
    raw = env_str(name)
    return int(raw) if raw else default


_said: set[str] = set()
DEFAULT_TOKENS_FILE = "tokens.txt"


def _say_once(line: str) -> None:
    if line not in _said:
        _said.add(line)
        print(line, file=sys.stderr)


@functools.cache
def running_gateway() -> str | None:
    """The base URL of the gateway a running ``flashsale up`` serves (from its stack file
    in ``FLASHSALE_DATA_DIR``), the users' default host so that ``-H`` may be left out;
    None when no ``up`` runs."""
    from flashsale.settings import Settings
    from stack import stackfile

    settings = Settings.from_env()
    data = stackfile.read(settings)
    if data is None or not stackfile.running(data):
        return None
    host = str(data.get("http_host") or "127.0.0.1")
    if host in ("0.0.0.0", "::"):  # a wildcard bind is reached on loopback
        host = "127.0.0.1"
    return f"http://{host}:{int(data['http_port'])}"


def announce_host(environment: Any) -> None:
    """At Locust's ``init``: say in one line when the running stack's gateway stands in
    for a missing ``-H``."""
    url = running_gateway()
    if environment.host is None and url is not None:
        _say_once(f"locust: no -H given; using the running stack's gateway {url}")


class TokenPool:
    """Bearer tokens from ``$LOCUST_TOKENS_FILE`` (one per line), handed out in turn.

    With ``--processes`` every process takes its own share (``index::stride``) so that
    shoppers stay distinct across processes; a process hands its share out again from
    the start once every token was taken.
    """

    def __init__(self, path: str, index: int = 0, stride: int = 1) -> None:
        if not path:
            raise RuntimeError("set LOCUST_TOKENS_FILE (see python -m loadtests.mint)")
        tokens = Path(path).read_text(encoding="ascii").split()
        self.tokens = tokens[index :: max(1, stride)] or tokens
        if not self.tokens:
            raise RuntimeError(f"{path} holds no tokens")
        self._next = 0
        self._lock = threading.Lock()

    def take(self) -> str:
        with self._lock:
            token = self.tokens[self._next % len(self.tokens)]
            self._next += 1
            return token


def process_share(environment: Any) -> tuple[int, int]:
    """``(index, stride)`` of this Locust process among the ``--processes`` workers.

    Asked when the first user starts, not at ``init``: a worker learns its index from
    the master only after it connected, and ``init`` fires before that (the index is
    still -1 then, the same in every worker).
    """
    options = getattr(environment, "parsed_options", None)
    processes = getattr(options, "processes", None) or 1
    stride = max(1, processes)  # Locust has replaced -1 by the core count before forking
    index = getattr(getattr(environment, "runner", None), "worker_index", 0) or 0
    return max(0, index) % stride, stride


_shared: dict[str, TokenPool] = {}


@functools.cache
def default_sale_id(host: str) -> int:
    """With LOCUST_SALE_ID unset: the one sale the gateway lists as running or upcoming
    (the demo sale after ``make run``); more or none is an error that lists them."""
    url = host.rstrip("/") + "/api/v1/flash-sales/active"
    with urllib.request.urlopen(url, timeout=5) as resp:
        sales = orjson.loads(resp.read())["data"]
    ids = [int(s["flash_sale_id"]) for s in sales]
    if len(ids) != 1:
        raise RuntimeError(
            f"set LOCUST_SALE_ID: {host} lists {len(ids)} running or upcoming sales {ids}"
        )
    _say_once(f"locust: LOCUST_SALE_ID unset; using sale {ids[0]}, the one {host} lists")
    return ids[0]


def token_pool(environment: Any) -> TokenPool:
    """This process's one pool over ``$LOCUST_TOKENS_FILE``, shared by every user class:
    in the mixed scenario shoppers and browsers take turns on one sequence, so no two
    users share an account while the file has tokens to spare."""
    path = env_str("LOCUST_TOKENS_FILE")
    if not path and Path(DEFAULT_TOKENS_FILE).is_file():
        path = DEFAULT_TOKENS_FILE  # what the README's mint line writes
        _say_once(f"locust: LOCUST_TOKENS_FILE unset; using {path}")
    pool = _shared.get(path)
    if pool is None:
        pool = _shared[path] = TokenPool(path, *process_share(environment))
    return pool


class OutcomeLog:
    """One line per attempt, ``accepted <order_id>`` or ``rejected <REASON>``, in
    ``<prefix>.<pid>`` (one file per process), for ``python -m loadtests.invariants``.

    The file is named by the process that writes, when it first writes: Locust imports
    the locustfile once and then forks its ``--processes`` workers, so a name taken at
    import would be the parent's, shared by every worker.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._file: TextIO | None = None
        self._pid = 0
        self._lock = threading.Lock()

    @property
    def path(self) -> Path | None:
        """The file this process writes (None without a prefix)."""
        return Path(f"{self.prefix}.{os.getpid()}") if self.prefix else None

    def _write(self, line: str) -> None:
        path = self.path
        if path is None:
            return
        with self._lock:
            if self._file is None or self._pid != os.getpid():
                # a file object inherited across a fork is the parent's: never write to it
                path.parent.mkdir(parents=True, exist_ok=True)
                self._file = path.open("a", encoding="utf-8", buffering=1)
                self._pid = os.getpid()
            self._file.write(line + "\n")

    def accepted(self, order_id: str) -> None:
        self._write(f"accepted\t{order_id}")

    def rejected(self, reason: str) -> None:
        self._write(f"rejected\t{reason}")

    def close(self) -> None:
        with self._lock:
            if self._file is not None and self._pid == os.getpid():
                self._file.close()
                self._file = None
