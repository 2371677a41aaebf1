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


class NoSale(Exception):
    """No sale that a scenario could run against (one line: what to do)."""


def choose_sale(host: str, mode: str = "open") -> tuple[int, str]:
    """The sale a scenario joins when LOCUST_SALE_ID is unset, and one line saying which.

    Of the sales the gateway lists in ``mode``: the running one (the newest, when several
    run), else the newest upcoming one (the scenario waits for its start), else a sold-out
    one (every join answers SOLD_OUT: the sold-out path). None is :class:`NoSale`.
    """
    url = host.rstrip("/") + "/api/v1/flash-sales/active"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            listed = orjson.loads(resp.read())["data"]
    except (OSError, ValueError, KeyError) as exc:
        raise NoSale(
            f"cannot list the sales of {host} ({exc}): is the gateway up? Or set LOCUST_SALE_ID"
        ) from None
    sales = [s for s in listed if s.get("mode", "open") == mode]
    by_status: dict[str, list[dict[str, Any]]] = {}
    for sale in sales:
        by_status.setdefault(str(sale["status"]), []).append(sale)
    for status, key, said in (
        ("active", "start_time", "running"),
        ("upcoming", "flash_sale_id", "upcoming, starts {start_time}"),
        ("sold_out", "start_time", "sold out: every join will be answered SOLD_OUT"),
    ):
        found = by_status.get(status)
        if found:
            pick = max(found, key=lambda s: (s[key], s["flash_sale_id"]))
            others = f"; the newest of {len(found)}" if len(found) > 1 else ""
            return int(pick["flash_sale_id"]), (
                f"LOCUST_SALE_ID unset; using sale {pick['flash_sale_id']} "
                f"({said.format(**pick)}{others}) of {host}"
            )
    others = f" ({len(listed)} in another mode)" if listed else ""
    raise NoSale(
        f"{host} lists no running or upcoming {mode} sale{others}: create one "
        "(docs/api.md) or set LOCUST_SALE_ID"
    )


def sale_for_the_run(environment: Any, mode: str = "open") -> int:
    """At Locust's ``init``: LOCUST_SALE_ID, or the sale :func:`choose_sale` picks, said in
    one line (by the master or the only process); no sale stops the run at once, in one
    line, rather than every user failing for the whole run."""
    given = env_int("LOCUST_SALE_ID", 0)
    host = environment.host or running_gateway()
    if given or host is None:  # without a host Locust itself says what is missing
        return given
    speaks = type(getattr(environment, "runner", None)).__name__ != "WorkerRunner"
    try:
        sale_id, line = choose_sale(host, mode)
    except NoSale as exc:
        if speaks:
            print(f"locust: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if speaks:
        _say_once(f"locust: {line}")
    return sale_id


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


# Where the scenarios write their outcome files unless LOCUST_OUTCOMES says otherwise, and
# where ``python -m loadtests.invariants`` looks for them by default.
DEFAULT_OUTCOMES = "out/outcomes"


class OutcomeLog:
    """One line per attempt, ``accepted <order_id>`` or ``rejected <REASON>``, in
    ``<prefix>.<pid>`` (one file per process), for ``python -m loadtests.invariants``;
    the file starts with ``sale <id>`` once :attr:`sale_id` is set, so that the report
    finds the sale without being told.

    The file is named by the process that writes, when it first writes: Locust imports
    the locustfile once and then forks its ``--processes`` workers, so a name taken at
    import would be the parent's, shared by every worker.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._file: TextIO | None = None
        self._pid = 0
        self._lock = threading.Lock()
        self.sale_id = 0

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
                if self.sale_id:
                    self._file.write(f"sale\t{self.sale_id}\n")
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
