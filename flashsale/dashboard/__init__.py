"""The sale dashboard's figures: one aggregate per second for every process of every host.

A snapshot of one sale joins three sources: Redis (the sale's live counters and the
reservations in flight), PostgreSQL (its orders by status, the units payment expiry
returned, the last reconcile's drift) and what every gateway worker and consumer published
to Redis. One job per module:

- ``sales``: the list of sales a dashboard shows, and a sale's merchant;
- ``totals``: what is counted (``Totals``), read out of Prometheus samples and written as
  the fields of a second's hash (``fs:{dash}:s:<epoch second>``) and the running totals;
- ``publish``: each process's ``Publisher``, once a second off the request path, adds what
  changed since its last publish (one pipelined write); gauges go under ``name|process``;
- ``aggregate``: the sum of the last seconds' hashes — rates over ``DASH_RATE_WINDOW_S``, join
  p50/p99 over ``DASH_LATENCY_WINDOW_S`` from summed histogram bins, a gauge as each process's
  latest value;
- ``snapshot``: one sale's figures now, and the merchant's view of them;
- ``history``: the last five minutes of snapshots, a point a second;
- ``hub``: per worker, one tick loop per watched sale. Only the process that wins
  ``SET … NX`` on a second's tick key computes that second's snapshot; every other worker
  reads it, so watching costs one GET a second per watched sale and nothing on the join path.

Which requests are joins, and every URL, is the HTTP layer's to say: the gateway hands the
publisher its join routes' templates. Prometheus ``/metrics`` stays per replica.
"""
