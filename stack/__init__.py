"""The stack: the ``flashsale`` command and the processes it runs.

It sits above everything else — it starts gateway workers (``gateway/``) and consumers
(``consumers/``) — and nothing below imports it. Load tests reach it through the stack
file, the CLI and the public functions here.

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
