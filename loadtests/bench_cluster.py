"""``flashsale bench`` on a Redis Cluster: the accept path on 1 vs 3 shards, the script cost
on one shard, one bucketed hot sale's accept path, and a sell-out in one bucket vs several.

A local valkey cluster (3 primaries, one replica each, the persistence the single-node rows
use) is started next to the bench's stack, and a second gateway (``flashsale serve`` with
``FLASHSALE_REDIS_CLUSTER=true`` and one ``WAIT 1`` per batch) on it; the same load
generator then joins one sale through it. On this machine the six nodes, the gateway and
the load generator share the same cores, so the row prices the cluster path (routing by
slot, the per-primary pipelines, the ``WAIT`` each batch ends with) against row 3; it
cannot show the scaling that more machines give (that is the capacity table's paper
projection from the per-shard script cost measured here).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from urllib.parse import urlsplit

from redis.cluster import RedisCluster

from flashsale.stores import rediskeys
from loadtests import loadgen, redis_ceiling
from loadtests.bench import (
    CONNECTIONS,
    JOIN_BODY,
    THREADS,
    Env,
    Plan,
    Row,
    Skip,
    _join_path,
    _load,
    _spawn,
    _stop,
    _wait_http,
    _wait_until,
    create_sale,
)
from loadtests.loadgen import RunResult
from stack import ValkeyCluster, free_port, start_redis_cluster

SHARDS = 3
BUCKETS = 6  # row 9c: one hot sale split over the shards (flashsale/flash/buckets.py)
NODE_TIMEOUT_MS = 10_000


def accept_on_shards(env: Env, plan: Plan, redis_fsync: str = "always") -> list[Row]:
    """Rows 8: the accept path through a gateway on a 3-shard cluster, and the reserve
    script's ceiling on the one primary that holds the sale (the cost per shard)."""
    cluster = start_redis_cluster(
        env.root / "cluster",
        shards=SHARDS,
        persist=redis_fsync != "off",
        appendfsync=redis_fsync if redis_fsync != "off" else "always",
        # the load shares the cores with six nodes: no failover for a slow heartbeat
        node_timeout_ms=NODE_TIMEOUT_MS,
    )
    try:
        rows: list[Row] = []
        sale_id = 0
        for wait in (1, 0):
            run, sale_id = _accept_through_cluster_gateway(env, plan, cluster, wait)
            rows.append(
                Row.from_run(
                    f"9 accept path on {SHARDS} shards (join, 202)" + ("" if wait else ", no WAIT"),
                    run,
                    note=f"{SHARDS} primaries + {SHARDS} replicas, "
                    + ("WAIT 1 per batch" if wait else "FLASHSALE_REDIS_WAIT_REPLICAS=0")
                    + "; compare row 3",
                )
            )
        run, bucketed = _accept_through_cluster_gateway(env, plan, cluster, 1, buckets=BUCKETS)
        rows.append(
            Row.from_run(
                f"9c one bucketed hot sale on {SHARDS} shards (join, 202)",
                run,
                note=f"one sale in {BUCKETS} buckets over the {SHARDS} primaries "
                f"({_spread(cluster, bucketed)}), WAIT 1 per batch; compare the first row 9",
            )
        )
        _drop_sale(cluster, bucketed, BUCKETS)
        rows.extend(sellout_on_shards(env, plan, cluster))
        try:
            rows.extend(_script_cost_on_one_shard(plan, cluster, sale_id))
        except (redis_ceiling.RedisBenchError, Skip) as exc:
            print(f"  9b skipped: {exc}", flush=True)  # rows 9 stand without it
        return rows
    finally:
        cluster.stop()


def _spread(cluster: ValkeyCluster, sale_id: int) -> str:
    """How many of the sale's buckets each primary holds, e.g. "2+2+2"."""
    held: dict[int, int] = {}
    for k in range(BUCKETS):
        port = cluster.primary_for(rediskeys.sale(sale_id, k)).port
        held[port] = held.get(port, 0) + 1
    return "+".join(str(n) for n in sorted(held.values(), reverse=True))


def _accept_through_cluster_gateway(
    env: Env, plan: Plan, cluster: ValkeyCluster, wait_replicas: int, *, buckets: int = 1
) -> tuple[RunResult, int]:
    """A gateway on the cluster, a fresh sale through it, the accept-path load on it."""
    return _through_cluster_gateway(
        env,
        cluster,
        wait_replicas,
        quantity=100_000_000,
        limit=1_000_000,
        buckets=buckets,
        load=lambda port, sale_id: _load(
            env,
            plan,
            port,
            _join_path(sale_id),
            method="POST",
            body=JOIN_BODY,
            expected=(202,),
            priced=_cluster_priced(env, cluster),
        ),
    )


def _cluster_priced(env: Env, cluster: ValkeyCluster) -> dict[str, int | list[int]]:
    """The cluster gateway's CPU, and every cluster node's summed as Redis's."""
    return {
        "gateway": env.procs["gateway-cluster"].pid,
        "redis": [n.proc.pid for n in cluster.nodes],
        "kafka": env.stores["kafka"],
    }


def sellout_on_shards(env: Env, plan: Plan, cluster: ValkeyCluster) -> list[Row]:
    """Rows 9d: the sell-out of one sale through a gateway on the cluster, in one bucket and
    in :data:`BUCKETS`: how long it takes, and what the end of a split sale costs (joins of
    emptied buckets that refill from the others, or answer 503 when they keep losing the
    race; the load generator does not retry, so a 503 here is a shopper who would)."""
    units, attempts = plan.sellout_units, plan.sellout_attempts
    tokens = env.root / "cluster-sellout-tokens.txt"
    tokens.write_text("\n".join(env.tokens_file.read_text().split()[:attempts]) + "\n")
    rows = []
    for n in (1, BUCKETS):

        def sell(port: int, sale_id: int, n: int = n) -> RunResult:
            return loadgen.run_python(
                _join_path(sale_id),
                port,
                tokens_file=tokens,
                method="POST",
                body=JOIN_BODY,
                expected=(202, 409, 503),
                processes=THREADS,
                connections=CONNECTIONS,
                duration_s=plan.sellout_timeout_s,
                max_requests=attempts,
                record=env.root / f"cluster-sellout-{n}",
            )

        run, sale_id = _through_cluster_gateway(
            env, cluster, 1, quantity=units, limit=1, buckets=n, load=sell
        )
        answers = ", ".join(f"{k} {v}" for k, v in sorted(run.statuses.items()))
        rows.append(
            Row.from_run(
                f"9d sell-out on {SHARDS} shards, {n} bucket(s)",
                run,
                note=f"{units} units/{attempts} tries: sold out in {run.last_accept_s:.2f}s; "
                f"answers {answers}" + (f"; buckets {_spread(cluster, sale_id)}" if n > 1 else ""),
            )
        )
        _drop_sale(cluster, sale_id, n)
    return rows


def _through_cluster_gateway(
    env: Env,
    cluster: ValkeyCluster,
    wait_replicas: int,
    *,
    quantity: int,
    limit: int,
    buckets: int,
    load: Callable[[int, int], RunResult],
) -> tuple[RunResult, int]:
    """A gateway on the cluster, a fresh sale through it, ``load(port, sale id)`` on it."""
    port = free_port()
    on_cluster = dataclasses.replace(env, gateway_url=f"http://127.0.0.1:{port}")
    try:
        child = _spawn(
            env,
            "gateway-cluster",
            [sys.executable, "-m", "stack", "serve"],
            extra_env={
                "FLASHSALE_REDIS_URL": cluster.url,
                "FLASHSALE_REDIS_CLUSTER": "true",
                "FLASHSALE_REDIS_WAIT_REPLICAS": str(wait_replicas),
                "FLASHSALE_HTTP_PORT": str(port),
            },
        )
        _wait_http(on_cluster.gateway_url + "/healthz", child)
        sale_id, start = create_sale(on_cluster, quantity, limit, extra={"buckets": buckets})
        _wait_until(start)
        return load(port, sale_id), sale_id
    finally:
        _stop(env, "gateway-cluster")


def _script_cost_on_one_shard(plan: Plan, cluster: ValkeyCluster, sale_id: int) -> list[Row]:
    """redis-benchmark EVALSHA reserve.lua on the primary holding ``sale_id``."""
    url = cluster.primary_for(rediskeys.sale(sale_id)).url
    port = int(urlsplit(url).port or 6379)
    keys, args = redis_ceiling.reserve_script_call(
        sale_id, "__rand_int__", redis_ceiling.server_run_id(url)
    )
    try:
        results = redis_ceiling.run_script(
            url, port, redis_ceiling.RESERVE_SCRIPT, keys, args, requests=plan.redis_requests
        )
    finally:
        _drop_sale(cluster, sale_id)
    return [
        Row(
            f"9b reserve.lua on one cluster primary -P {r.pipeline}",
            r.rps,
            r.p50_ms,
            r.p99_ms,
            r.errors,
            "redis-benchmark -c 50 EVALSHA reserve.lua, the script cost per shard",
            r.to_dict(),
        )
        for r in results
    ]


def _drop_sale(cluster: ValkeyCluster, sale_id: int, buckets: int = 1) -> None:
    """Remove the benchmark-only sale (each bucket's keys share a slot; the sales index is
    another)."""
    node = cluster.nodes[0]
    client = RedisCluster(host="127.0.0.1", port=node.port, password=cluster.password)
    try:
        for k in range(buckets):
            for key in rediskeys.all_sale_keys(sale_id, k):
                client.delete(key)
        client.srem(rediskeys.SALES_INDEX, sale_id)
    finally:
        client.close()
