"""What a running ``flashsale up`` started, written to its data folder for the side
commands (reconcile, rebuild-cache, the load-test tools) and for its own next start.

``<data folder>/stack.json`` (mode 0600: it holds the servers' passwords) names the URLs
of the servers, the gateway's base URL, and the pid of the ``up`` that wrote it. The
embedded servers' ports are kept across restarts (when still free), so URLs copied from a
banner stay good. A side command whose ``FLASHSALE_*`` URLs are unset reads the file while
that ``up`` runs, and says so in one line.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from flashsale.settings import Settings

NAME = "stack.json"
FIELDS = ("redis_url", "database_url", "kafka_bootstrap")
FLAGS = ("redis_cluster",)  # how to read a URL taken from the file


def path(settings: Settings) -> Path:
    return Path(settings.data_dir) / NAME


def write(settings: Settings, ports: dict[str, int]) -> None:
    """Record the running stack (0600)."""
    target = path(settings)
    data: dict[str, Any] = {f: getattr(settings, f) for f in (*FIELDS, *FLAGS)}
    data.update(
        pid=os.getpid(),
        gateway=f"http://{settings.http_host}:{settings.http_port}",
        http_host=settings.http_host,
        http_port=settings.http_port,
        ports=ports,
    )
    tmp = target.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(data, out, indent=2)
    tmp.replace(target)


def read(settings: Settings) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path(settings).read_text())
    except (OSError, ValueError):
        return None
    return data


def remembered_ports(settings: Settings) -> dict[str, int]:
    """The embedded servers' ports of the previous run, those that are free now."""
    data = read(settings) or {}
    out = {}
    for name, port in (data.get("ports") or {}).items():
        with socket.socket() as probe:
            # connections of the last run in TIME_WAIT do not count: servers reuse addresses
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", int(port)))
            except OSError:
                continue
        out[name] = int(port)
    return out


def running(data: dict[str, Any]) -> bool:
    try:
        os.kill(int(data["pid"]), 0)
    except (KeyError, ValueError, ProcessLookupError, PermissionError):
        return False
    return True


def fill(settings: Settings, *, quiet: bool = False) -> Settings:
    """``settings`` with its unset server URLs (and secret key, from the data folder's
    ``secret_key``) taken from a running ``up``'s stack file."""
    missing = [f for f in (*FIELDS, "secret_key") if getattr(settings, f) is None]
    if not missing:
        return settings
    data = read(settings)
    if data is None or not running(data):
        return settings
    secret = Path(settings.data_dir) / "secret_key"
    if "secret_key" in missing and secret.exists():
        data = {**data, "secret_key": secret.read_text().strip()}
    found = {f: data[f] for f in missing if data.get(f)}
    if not found:
        return settings
    if not quiet:
        print(
            f"flashsale: using the running stack's servers from {path(settings)} "
            f"(pid {data['pid']}): {', '.join(sorted(found))}",
            file=sys.stderr,
        )
    if "redis_url" in found and data.get("redis_cluster"):
        found["redis_cluster"] = True
    return settings.with_(**found)
