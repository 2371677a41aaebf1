"""The stack: the ``flashsale`` command and the processes it runs.

It sits above everything else — it starts gateway workers (``gateway/``) and consumers
(``consumers/``) — and nothing below imports it. Load tests reach it through the stack
file, the CLI and the names ``__all__`` lists below (``tests/test_layers.py`` holds them
to it).

- ``cli``: the ``flashsale`` command (``python -m stack`` is the same).
- ``up``: ``flashsale up``, the whole stack in one command (embedded servers, migrations,
  demo data, workers, consumers) and its stop order.
- ``processes``: running and supervising processes: one gateway worker in this process,
  N workers on one port, restart with backoff, crash-loop detection, stopping children.
- ``listen``: a worker's listening socket, taking every queued connection at each wake-up.
- ``embedded``: the embedded servers (valkey single and cluster, PostgreSQL, the tansu broker).
- ``stackfile``: ``.flashsale/stack.json``, how the other commands find a running stack.
- ``preflight``: the checks before starting (ports free, stores answering).
- ``logs``: JSON log lines for every process.
- ``capacity``: ``flashsale capacity``, the hardware a sale needs from the bench's costs.
- ``clean``: ``flashsale clean``, everything the stack kept for one data folder removed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from stack.embedded import EmbeddedError as EmbeddedError
    from stack.embedded import EmbeddedStack as EmbeddedStack
    from stack.embedded import ValkeyCluster as ValkeyCluster
    from stack.embedded import die_with_parent as die_with_parent
    from stack.embedded import free_port as free_port
    from stack.embedded import postgres_bin_dir as postgres_bin_dir
    from stack.embedded import restart_server as restart_server
    from stack.embedded import start_redis as start_redis
    from stack.embedded import start_redis_cluster as start_redis_cluster
    from stack.embedded import start_stack as start_stack
    from stack.embedded import tansu_binary as tansu_binary
    from stack.embedded import valkey_binary as valkey_binary
    from stack.processes import child_env as child_env
    from stack.processes import run_until_signalled as run_until_signalled
    from stack.processes import stop_children as stop_children
    from stack.processes import supervise as supervise

# The load tests' way in, each name from the module that defines it, imported when first
# asked for: a command that needs none of them (``flashsale consume``, ``flashsale clean``)
# does not pay for importing the gateway app (stack.processes) and the embedded servers.
_FROM: Final = {
    **dict.fromkeys(
        (
            "EmbeddedError",
            "EmbeddedStack",
            "ValkeyCluster",
            "die_with_parent",
            "free_port",
            "postgres_bin_dir",
            "restart_server",
            "start_redis",
            "start_redis_cluster",
            "start_stack",
            "tansu_binary",
            "valkey_binary",
        ),
        "stack.embedded",
    ),
    **dict.fromkeys(
        ("child_env", "run_until_signalled", "stop_children", "supervise"), "stack.processes"
    ),
}
__all__ = sorted(_FROM)

if not TYPE_CHECKING:  # to mypy, a module __getattr__ would make every name exist

    def __getattr__(name: str) -> Any:
        if name not in _FROM:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        return getattr(importlib.import_module(_FROM[name]), name)
