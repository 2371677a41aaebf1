"""Plain helpers the Locust scenarios share: tokens, settings, outcome files.

Kept free of Locust and gevent imports so that tests can import it (gevent's
monkey-patching must never run inside pytest).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TextIO


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def env_float(name: str, default: float) -> float:
    raw = env_str(name)
    return float(raw) if raw else default


def env_int(name: str, default: int) -> int:
    raw = env_str(name)
    return int(raw) if raw else default


class TokenPool:
    """Bearer tokens from ``$LOCUST_TOKENS_FILE`` (one per line), handed out in turn.

    With ``--processes`` every process takes its own share (``index::stride``) so that
    shoppers stay distinct across processes.
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


class OutcomeLog:
    """One line per attempt, ``accepted <order_id>`` or ``rejected <REASON>``, in
    ``<prefix>.<pid>`` (one file per process), for ``python -m loadtests.invariants``."""

    def __init__(self, prefix: str) -> None:
        self.path = Path(f"{prefix}.{os.getpid()}") if prefix else None
        self._file: TextIO | None = None
        self._lock = threading.Lock()

    def _write(self, line: str) -> None:
        if self.path is None:
            return
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = self.path.open("a", encoding="utf-8", buffering=1)
            self._file.write(line + "\n")

    def accepted(self, order_id: str) -> None:
        self._write(f"accepted\t{order_id}")

    def rejected(self, reason: str) -> None:
        self._write(f"rejected\t{reason}")

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
