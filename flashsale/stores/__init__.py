"""The stores: how the core reaches Redis, Kafka and PostgreSQL, and nothing of the domain.

- ``db``: the asyncpg pool, the migration runner (``flashsale/migrations/``).
- ``redisclient``: opening Redis, one node or a Redis Cluster, and a server's run id.
- ``rediskeys``: every Redis key name (a sale's keys share one hash tag per bucket).
- ``scripts``: the Lua loader, ``FlashScripts`` and one ``IntEnum`` per script result.
- ``redisbatch``: the lean pipelined connection the join path reserves through.
- ``clusterbatch``: the same on a Redis Cluster, one batcher per primary, routed by slot.
- ``kafka``: the order producer and ``ensure_topics``.
- ``ids``: order ids and the machine-id lease they rest on.
- ``tasks``: background tasks that are kept, named and cancelled on the way out, and the
  one guarded loop that outlives a lost connection.
- ``follow``: a worker's copy of shared state kept in step with Redis (publish + poll).
- ``metrics``: the Prometheus metrics.

Nothing here imports a domain module (``tests/test_layers.py``).
"""
