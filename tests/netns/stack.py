"""The whole service over test hosts: a valkey cluster (3 primaries + 3 replicas, one node a
host), the broker, PostgreSQL, two gateway hosts and a consumer host, each in its own
network namespace (``tests/netns/hosts.py``). Every server listens on its host's address;
the gateways and the consumer are the project's own processes (``python -m stack``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
from redis import Redis as SyncRedis
from redis.exceptions import RedisError, ResponseError

from flashsale.settings import Settings
from flashsale.stores.db import create_pool, migrate
from stack.embedded import Server, start_kafka, start_postgres, start_redis, valkey_binary
from tests.faultkit import Proc
from tests.netns.hosts import Network

REDIS_HOSTS = ("r0", "r1", "r2", "r3", "r4", "r5")
GATEWAYS = ("gw-a", "gw-b")
HOSTS = (*REDIS_HOSTS, "broker", "pg", *GATEWAYS, "consumer")
REDIS_PORT = 6379
KAFKA_PORT = 9092
PG_PORT = 5432
HTTP_PORT = 8080
NODE_TIMEOUT_MS = 3000  # a primary silent this long is replaced by its replica
SECRET = "netns-secret-key-0123456789abcdef"


@dataclass
class Postgres:
    """PostgreSQL on its host, kept for a whole module (initdb costs seconds)."""

    server: Server
    admin_url: str


def start_pg(net: Network, root: Path) -> Postgres:
    with net.inside("pg") as host:
        server = start_postgres(root / "pg", port=PG_PORT, durable=False, host=host.ip)
    return Postgres(server, server.url)


@dataclass
class NetStack:
    net: Network
    root: Path
    settings: Settings
    password: str
    redis_nodes: dict[str, Server]
    kafka: Server
    gateways: dict[str, Proc] = field(default_factory=dict)
    consumer: Proc | None = None

    @classmethod
    async def start(cls, net: Network, pg: Postgres, root: Path, **changes: object) -> NetStack:
        password = secrets.token_hex(16)
        # in this thread, not a worker's: the servers die with the thread that started them
        nodes, kafka = _start_servers(net, root, password)
        try:
            dbname = "flashsale_netns_" + secrets.token_hex(4)
            admin = await asyncpg.connect(pg.admin_url)
            await admin.execute(f'CREATE DATABASE "{dbname}"')
            await admin.close()
            tag = secrets.token_hex(3)
            settings = (
                Settings.from_env({})
                .with_(
                    redis_url=",".join(
                        f"redis://:{password}@{net[n].ip}:{REDIS_PORT}/0" for n in REDIS_HOSTS
                    ),
                    redis_cluster=True,
                    redis_wait_replicas=1,
                    database_url=pg.admin_url.rsplit("/", 1)[0] + "/" + dbname,
                    kafka_bootstrap=kafka.url,
                    secret_key=SECRET,
                    kafka_orders_topic=f"netns.orders.{tag}",
                    kafka_dlq_topic=f"netns.orders.dlq.{tag}",
                    kafka_consumer_group=f"netns-{tag}",
                    kafka_partitions=4,
                    kafka_produce_timeout_ms=2000,
                    kafka_session_timeout_ms=6000,
                    kafka_heartbeat_interval_ms=1000,
                    http_host="0.0.0.0",  # every address of the host's own namespace
                    http_port=HTTP_PORT,
                    workers=1,
                    metrics_port=0,
                    db_pool_max=20,
                    stranded_after_s=2,
                    claim_stale_s=3,
                    sweep_interval_ms=200,
                    rate_user_per_s=1000.0,
                    rate_user_burst=1000,
                    rate_ip_per_s=1e6,
                    rate_ip_burst=1_000_000,
                    access_log=False,
                    payment_provider="sandbox",
                )
                .with_(**changes)
            )
            pool = await create_pool(settings.database, min_size=1, max_size=1)
            async with pool.acquire() as conn:
                await migrate(conn)
            await pool.close()
        except BaseException:
            for server in nodes.values():
                server.stop()
            kafka.stop()
            raise
        stack = cls(net, root, settings, password, nodes, kafka)
        try:
            await asyncio.to_thread(stack.wait_cluster_ok)
            for name in GATEWAYS:
                stack.gateways[name] = stack._process(name, "serve")
            stack.consumer = stack._process("consumer", "consume")
            await stack.ready()
        except BaseException:
            stack.stop()
            raise
        return stack

    def _process(self, host: str, command: str) -> Proc:
        folder = self.root / host
        folder.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
        env.update(self.settings.with_(data_dir=str(folder)).to_env())
        with self.net.inside(host):
            return Proc(host, [command], env, folder / f"{command}.log").start()

    def base_url(self, gateway: str) -> str:
        return f"http://{self.net[gateway].ip}:{HTTP_PORT}"

    async def ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as http:
            for name in GATEWAYS:
                while True:
                    try:
                        async with http.get(self.base_url(name) + "/readyz") as resp:
                            if resp.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    if time.monotonic() > deadline:
                        raise AssertionError(f"{name} did not become ready:\n{self.log_tail()}")
                    await asyncio.sleep(0.2)

    def node(self, name: str) -> SyncRedis:
        return SyncRedis(
            host=self.net[name].ip, port=REDIS_PORT, password=self.password, socket_timeout=2
        )

    def cluster_view(self, name: str) -> dict[str, str]:
        """What ``name`` thinks: ``{host: "primary" | "replica"}`` for the nodes it sees."""
        by_ip = {h.ip: n for n, h in self.net.hosts.items()}
        with self.node(name) as r:
            lines = r.execute_command("CLUSTER", "NODES")
        if isinstance(lines, bytes):
            lines = lines.decode()
        out = {}
        text = lines if isinstance(lines, str) else "\n".join(lines)
        for line in text.strip().splitlines():
            parts = line.split()
            ip = parts[1].split(":")[0]
            if ip in by_ip:
                out[by_ip[ip]] = "primary" if "master" in parts[2] else "replica"
        return out

    def primary_for(self, key: str, asking: str | None = None) -> str:
        """The host serving ``key``'s slot, as node ``asking`` (or the first that answers)
        sees it."""
        by_ip = {h.ip: n for n, h in self.net.hosts.items()}
        for name in [asking] if asking else REDIS_HOSTS:
            try:
                with self.node(name) as r:
                    slot = int(r.execute_command("CLUSTER", "KEYSLOT", key))
                    for entry in r.execute_command("CLUSTER", "SLOTS"):
                        if int(entry[0]) <= slot <= int(entry[1]):
                            ip = entry[2][0]
                            return by_ip[ip.decode() if isinstance(ip, bytes) else ip]
            except RedisError:
                continue
        raise AssertionError(f"no node knows who serves {key!r}")

    def log_ids(self, name: str, keys: list[str]) -> set[str]:
        """The order ids in the reservation logs ``keys`` that node ``name`` holds."""
        out: set[str] = set()
        with self.node(name) as r:
            r.config_set("cluster-allow-reads-when-down", "yes")
            try:
                for key in keys:
                    with contextlib.suppress(ResponseError):  # MOVED: a slot it does not hold
                        out |= {k.decode() for k in r.hkeys(key)}
            finally:
                r.config_set("cluster-allow-reads-when-down", "no")
        return out

    def replica_of(self, primary: str) -> str:
        for name in REDIS_HOSTS:
            with self.node(name) as r:
                info = r.info("replication")
            if info.get("role") == "slave" and info.get("master_host") == self.net[primary].ip:
                return name
        raise AssertionError(f"{primary} has no replica")

    def cluster_ok(self) -> bool:
        """Every node sees the cluster ok, every slot served, each replica linked."""
        for name in REDIS_HOSTS:
            try:
                with self.node(name) as r:
                    info = r.execute_command("CLUSTER", "INFO")
                    text = info.decode() if isinstance(info, bytes) else str(info)
                    if "cluster_state:ok" not in text or "cluster_slots_ok:16384" not in text:
                        return False
                    rep = r.info("replication")
                    if rep.get("role") == "slave" and rep.get("master_link_status") != "up":
                        return False
            except RedisError:
                return False
        return True

    def wait_cluster_ok(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.cluster_ok():
            if time.monotonic() > deadline:
                raise AssertionError(f"the valkey cluster is not ok after {timeout_s}s")
            time.sleep(0.2)

    def stop(self) -> None:
        for proc in [*self.gateways.values(), *([self.consumer] if self.consumer else [])]:
            proc.stop(30)
        self.kafka.stop()
        for server in self.redis_nodes.values():
            server.stop()

    def log_tail(self, n: int = 2500) -> str:
        out = []
        for proc in [*self.gateways.values(), *([self.consumer] if self.consumer else [])]:
            if proc.log_path.exists():
                text = proc.log_path.read_text(errors="replace")[-n:]
                out.append(f"--- {proc.name} {proc.log_path.name}\n{text}")
        return "\n".join(out)


def _start_servers(net: Network, root: Path, password: str) -> tuple[dict[str, Server], Server]:
    """The valkey nodes, joined into one cluster, and the broker, each on its host."""
    nodes: dict[str, Server] = {}
    try:
        for name in REDIS_HOSTS:
            with net.inside(name) as host:
                nodes[name] = start_redis(
                    root / name,
                    port=REDIS_PORT,
                    persist=False,
                    password=password,
                    host=host.ip,
                    extra_args=[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        str(NODE_TIMEOUT_MS),
                        # as stack/embedded.py: the sale fence, not the replica's age,
                        # covers what a promoted replica missed
                        "--cluster-replica-validity-factor",
                        "0",
                        "--masterauth",
                        password,
                    ],
                )
        subprocess.run(
            [
                str(valkey_binary().parent / "valkey-cli"),
                "--cluster",
                "create",
                *(f"{net[n].ip}:{REDIS_PORT}" for n in REDIS_HOSTS),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            env={**os.environ, "REDISCLI_AUTH": password},
            capture_output=True,
            check=True,
            timeout=120,
        )
        with net.inside("broker") as host:
            kafka = start_kafka(root / "broker", port=KAFKA_PORT, host=host.ip)
    except BaseException:
        for server in nodes.values():
            server.stop()
        raise
    return nodes, kafka
