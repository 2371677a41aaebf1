"""Checks made before anything starts, each failing at once with one line that names
what is wrong and what to do: the HTTP port is taken, a given server is unreachable."""

from __future__ import annotations

import contextlib
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

from flashsale.settings import PREFIX, Settings

CONNECT_TIMEOUT_S = 2.0


class PreflightFailed(Exception):
    """One line for the operator."""


def claim_port(host: str, port: int) -> socket.socket:
    """Fail if anything is bound to ``host:port``; else hold it for this stack.

    The gateway's workers share their port with ``SO_REUSEPORT``, so a second stack's
    workers would silently join the first one's. A bind with ``SO_REUSEADDR`` only (so that
    connections of a stack just stopped, in TIME_WAIT, do not count) fails while any socket
    listens there — ours or any other program's — or while another stack holds it. The
    socket returned is bound with ``SO_REUSEPORT`` only and never listens: this stack's
    workers join it, and the next stack's check fails. Keep it open while the stack runs.
    """
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind((host, port))
    except OSError as exc:
        raise PreflightFailed(
            f"{host}:{port} is already in use ({exc.strerror}): another flashsale or another "
            f"program listens there; stop it or set {PREFIX}HTTP_PORT"
        ) from None
    finally:
        probe.close()
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((host, port))
    return holder


def _endpoints(name: str, url: str) -> list[tuple[str, int]] | Path:
    if name == "kafka_bootstrap":
        out = []
        for part in url.split(","):
            host, _, port = part.strip().rpartition(":")
            out.append((host or "127.0.0.1", int(port or 9092)))
        return out
    if name == "redis_url" and "," in url:  # a cluster's seed nodes: one must answer
        return [
            (urlsplit(u.strip()).hostname or "127.0.0.1", urlsplit(u.strip()).port or 6379)
            for u in url.split(",")
        ]
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return Path(parts.path)
    default = 5432 if name == "database_url" else 6379
    return [(parts.hostname or "127.0.0.1", parts.port or default)]


def check_reachable(settings: Settings) -> None:
    """Every server URL that is set must accept a TCP connection (a unix socket must
    exist); raise PreflightFailed naming the first that does not."""
    for name in ("redis_url", "database_url", "kafka_bootstrap"):
        url = getattr(settings, name)
        if url is None:
            continue
        target = _endpoints(name, url)
        shown = re.sub(r"//[^@/]*@", "//", url)  # never print a password
        if isinstance(target, Path):
            if not target.exists():
                raise PreflightFailed(f"{PREFIX}{name.upper()}={shown}: no socket at {target}")
            continue
        errors = []
        for host, port in target:
            try:
                with contextlib.closing(socket.create_connection((host, port), CONNECT_TIMEOUT_S)):
                    break
            except OSError as exc:
                errors.append(f"{host}:{port} {exc.strerror or exc}")
        else:
            raise PreflightFailed(
                f"{PREFIX}{name.upper()}={shown} is unreachable ({'; '.join(errors)}); "
                "start it, fix the URL, or unset it to let `flashsale up` start its own"
            )
