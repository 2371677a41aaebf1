"""The stampede across hosts that lose each other: every server and process on a host of its
own (a network namespace, ``tests/netns/``), the network cut or split mid-sale for a set
time, then healed; the history checker holds the stores to every answer a shopper got.

Each case prints its row of the table in docs/architecture.md ("What survives what"). One
runs in ``make test``; all run in ``make chaos`` (``make netns`` runs only these).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from flashsale.auth import TokenService
from flashsale.stores import rediskeys
from flashsale.stores.db import create_pool
from flashsale.stores.redisclient import open_redis
from tests.flashkit import admin_headers, create_sale_over_http, make_sku, make_users
from tests.netns.history import Shopper, Verdict, judge, shop, until
from tests.netns.hosts import NamespacesUnavailable, Network
from tests.netns.stack import GATEWAYS, HOSTS, NetStack, Postgres, start_pg

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.netns]

SQL_ORDER_IDS = "SELECT id FROM orders WHERE flash_sale_id = $1"


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="flashsale-netns-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def net() -> Iterator[Network]:
    try:
        network = Network.build(HOSTS)
    except NamespacesUnavailable as exc:
        pytest.skip(f"no network namespaces here: {exc}")
    yield network
    network.stop()


@pytest.fixture(scope="module")
def pg(net: Network, root: Path) -> Iterator[Postgres]:
    started = start_pg(net, root)
    yield started
    started.server.stop()


@pytest.fixture
async def stack(net: Network, pg: Postgres, root: Path) -> AsyncIterator[NetStack]:
    folder = Path(tempfile.mkdtemp(dir=root, prefix="case-"))
    started = await NetStack.start(net, pg, folder)
    yield started
    net.heal()
    started.stop()


class Sale:
    """A sale on ``stack`` with its shoppers, each told to use one gateway first."""

    def __init__(
        self, stack: NetStack, sale_id: int, shoppers: list[Shopper], late: list[Shopper]
    ) -> None:
        self.stack = stack
        self.id = sale_id
        self.shoppers = shoppers
        self.late = late  # they join once the crowd is done and the sale has converged

    @classmethod
    async def open(cls, stack: NetStack, *, quantity: int, shoppers: int, buckets: int = 1) -> Sale:
        tokens = TokenService(stack.settings.secret, 3600)
        db = await create_pool(stack.settings.database, min_size=1, max_size=2)
        try:
            # as many late shoppers as units: they come once the crowd is done and the sale
            # has converged, and buy whatever came back on sale
            users = await make_users(db, shoppers + quantity)
            async with aiohttp.ClientSession() as http:
                sale_id = await create_sale_over_http(
                    http,
                    stack.base_url(GATEWAYS[0]),
                    await admin_headers(db, tokens),
                    await make_sku(db, on_hand=quantity),
                    quantity,
                    buckets=buckets,
                )
        finally:
            await db.close()
        urls = [stack.base_url(g) for g in GATEWAYS]
        crowd = [
            Shopper(u, tokens.issue(u, "user"), urls[i % 2 :] + urls[: i % 2])
            for i, u in enumerate(users)
        ]
        return cls(stack, sale_id, crowd[:shoppers], crowd[shoppers:])

    def accepted(self) -> int:
        return sum(1 for s in self.shoppers if s.order_id is not None)


@dataclass
class Fault:
    """One partition: made by ``make()``, held ``hold_s`` seconds, ``before_heal()`` (to
    look at a side while it is apart), then healed."""

    make: Callable[[], object]
    hold_s: float = 10.0
    before_heal: Callable[[], object] = lambda: None
    accepted_during: int = 0  # 202s the shoppers got while it held


async def partitioned(
    case: str,
    stack: NetStack,
    sale: Sale,
    *faults: Fault,
    after_accepted: int = 40,
    per_second: float = 200.0,
) -> Verdict:
    """The stampede on ``sale``; once ``after_accepted`` shoppers hold a 202, each fault in
    turn; the checker judges once the crowd is done."""
    crowd = asyncio.create_task(shop(sale.shoppers, sale.id, per_second=per_second))
    try:
        await until(lambda: sale.accepted() >= after_accepted, "the first joins accepted")
        for fault in faults:
            before = sale.accepted()
            fault.make()
            await asyncio.sleep(fault.hold_s)
            fault.before_heal()
            stack.net.heal()
            fault.accepted_during = sale.accepted() - before
    finally:
        stack.net.heal()
    healed_at = time.monotonic()
    await crowd
    try:
        return await judged(case, stack, sale, sale.shoppers, healed_at, late=sale.late)
    except AssertionError:
        print(stack.log_tail(), flush=True)
        raise


async def judged(
    case: str,
    stack: NetStack,
    sale: Sale,
    shoppers: list[Shopper],
    healed_at: float,
    **options: Any,
) -> Verdict:
    redis: Redis = open_redis(stack.settings)
    db = await create_pool(stack.settings.database, min_size=1, max_size=4)
    try:
        return await judge(case, db, redis, sale.id, shoppers, healed_at, **options)
    finally:
        await redis.aclose()
        await db.close()


async def test_gateway_cut_from_the_broker_not_from_redis(stack: NetStack) -> None:
    """Gateway host A loses the broker for 10 s but keeps Redis: its reservations are made,
    their events cannot be produced. Nothing it accepted is lost, nothing stays held: the
    units of every join it could not publish are given back (and bought by late shoppers) or
    published by the sweeper."""
    sale = await Sale.open(stack, quantity=200, shoppers=600)
    verdict = await partitioned(
        "gateway host cut from the broker (not from Redis) for 10 s",
        stack,
        sale,
        Fault(lambda: stack.net.sever(["gw-a"], ["broker"])),
    )
    # three shoppers a unit: everything sold, during the stampede or once given back
    assert verdict.accepted + verdict.back_on_sale == 200, verdict.answers
    # the checker itself says no to a history the stores do not hold
    yes = next(s for s in sale.shoppers if s.order_id is not None)
    everyone = [*sale.shoppers, *sale.late]
    ghost = replace(yes, order_id="0" * 20, attempts=[])  # told yes, never written
    now = time.monotonic()
    with pytest.raises(AssertionError, match="not in PostgreSQL"):
        await judged(
            "self-check: a 202 never written (must fail)",
            stack,
            sale,
            [*everyone, ghost],
            now,
            converge_s=1,
        )
    denied = replace(yes, order_id=None, refused="SOLD_OUT")  # told no, holds an order
    others = [s for s in everyone if s is not yes]
    with pytest.raises(AssertionError, match="told no but holding an order"):
        await judged(
            "self-check: told no, holds an order (must fail)",
            stack,
            sale,
            [*others, denied],
            now,
            converge_s=1,
        )


async def _primary_cut_off(stack: NetStack, buckets: int) -> None:
    sale = await Sale.open(stack, quantity=200, shoppers=600, buckets=buckets)
    key = rediskeys.sale(sale.id)
    primary = stack.primary_for(key)
    replica = stack.replica_of(primary)
    promoted: list[str] = []
    held: set[str] = set()
    logs = [rediskeys.log(sale.id, k) for k in range(buckets)]

    def before_heal() -> None:
        promoted.append(stack.primary_for(key, asking=replica))
        held.update(stack.log_ids(primary, logs))  # what the old primary still holds

    what = "the sale" if buckets == 1 else f"bucket 0 of a sale in {buckets} buckets"
    verdict = await partitioned(
        f"the primary holding {what} split away with one gateway host for 10 s",
        stack,
        sale,
        Fault(lambda: stack.net.split([primary, "gw-a"]), before_heal=before_heal),
    )
    db = await create_pool(stack.settings.database, min_size=1, max_size=1)
    try:
        persisted = {r["id"] for r in await db.fetch(SQL_ORDER_IDS, sale.id)}
    finally:
        await db.close()
    # reservations only the old primary had (WAIT never confirmed them): dropped when it
    # rejoined as a replica, and none of them was answered 202
    dropped = held - persisted
    print(f"reservations the old primary made alone, dropped at heal: {len(dropped)}")
    assert not dropped & {s.order_id for s in sale.shoppers}
    assert promoted == [replica], "no failover on the majority side"
    await until(stack.cluster_ok, "the cluster whole again")
    assert stack.cluster_view(replica)[primary] == "replica"  # the old primary rejoined as one
    assert verdict.accepted + verdict.back_on_sale == 200, verdict.answers


@pytest.mark.chaos
@pytest.mark.timeout(300)
async def test_primary_split_away_with_one_gateway(stack: NetStack) -> None:
    """The primary holding a hot sale and gateway host A on one side, everything else on
    the other, for 10 s: the majority promotes the replica, the sale is fenced and
    recounted, and joins go on through gateway B. A's joins on the old primary cannot be
    confirmed by WAIT (its replica is on the other side): 503 OUTCOME_UNKNOWN, resolved by
    the shoppers' keyed retries once healed, when the old primary has rejoined as a replica
    and dropped what it wrote alone."""
    await _primary_cut_off(stack, buckets=1)


@pytest.mark.chaos
@pytest.mark.timeout(300)
async def test_primary_split_away_with_one_gateway_bucketed_sale(stack: NetStack) -> None:
    """The same with the sale in 6 buckets over the 3 primaries."""
    await _primary_cut_off(stack, buckets=6)


@pytest.mark.chaos
@pytest.mark.timeout(300)
async def test_consumer_cut_from_postgres_then_from_the_broker(stack: NetStack) -> None:
    """The consumer host loses PostgreSQL for 10 s while batches are being written, then the
    broker for 10 s while it commits offsets, then everything (its link down) for 10 s.
    Joins go on (the gateways need neither); every order is written once afterwards."""
    # a slow sale (12 shoppers a second, the stock lasting about 40 s): orders keep coming
    # through all three faults
    sale = await Sale.open(stack, quantity=450, shoppers=600)
    faults = [
        Fault(lambda: stack.net.sever(["consumer"], ["pg"])),
        Fault(lambda: stack.net.sever(["consumer"], ["broker"])),
        Fault(lambda: stack.net.cut("consumer")),
    ]
    verdict = await partitioned(
        "the consumer host cut from PostgreSQL, then from the broker, then off (10 s each)",
        stack,
        sale,
        *faults,
        after_accepted=20,
        per_second=12,
    )
    print("accepted during each fault:", [f.accepted_during for f in faults])
    assert all(f.accepted_during for f in faults)
    assert verdict.accepted + verdict.back_on_sale == 450, verdict.answers


@pytest.mark.chaos
@pytest.mark.timeout(300)
async def test_gateways_on_both_sides_of_a_split(stack: NetStack) -> None:
    """A split with a gateway host on each side, both taking joins for the same sale: A with
    the sale's primary, the broker, the consumer and PostgreSQL; B with the other five valkey
    nodes, which promote the primary's replica. A's joins cannot be confirmed by WAIT, B's
    cannot be published: each side answers 503 and holds nothing once healed."""
    sale = await Sale.open(stack, quantity=200, shoppers=600)
    primary = stack.primary_for(rediskeys.sale(sale.id))
    verdict = await partitioned(
        "two gateway hosts on opposite sides of a split for 10 s",
        stack,
        sale,
        Fault(lambda: stack.net.split(["gw-a", primary, "broker", "consumer", "pg"])),
    )
    assert verdict.accepted + verdict.back_on_sale == 200, verdict.answers


@pytest.mark.chaos
@pytest.mark.timeout(300)
async def test_replica_of_the_sales_primary_cut_off(stack: NetStack) -> None:
    """The replica of the primary holding the sale loses its link for 10 s: no failover,
    but no batch of that primary can be confirmed by WAIT while it is away."""
    sale = await Sale.open(stack, quantity=200, shoppers=600)
    primary = stack.primary_for(rediskeys.sale(sale.id))
    replica = stack.replica_of(primary)
    linked: list[int] = []

    def look() -> None:
        with stack.node(primary) as r:
            linked.append(int(r.info("replication")["connected_slaves"]))

    cut = Fault(lambda: stack.net.cut(replica), before_heal=look)
    verdict = await partitioned(
        "the replica of the sale's primary cut off for 10 s", stack, sale, cut
    )
    print(
        f"joins accepted while the replica was away: {cut.accepted_during}; "
        f"replicas the primary counted at the end of it: {linked}"
    )
    assert verdict.accepted + verdict.back_on_sale == 200, verdict.answers


@pytest.mark.chaos
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("away_s", "stranded_after_s"),
    [
        (4.5, 5),  # the default stranded_after_s: nothing of it published yet
        # the sale sells out on the primary alone, and keyed retries come back on a sale
        # their worker holds sold out: told yes only through the reservation script's batch,
        # whose WAIT covers the record (lua/reserve.lua rewrites it on a replay)
        (10, 60),
    ],
    ids=["sale-still-open", "sold-out-meanwhile"],
)
async def test_replica_away_then_the_primary(
    net: Network, pg: Postgres, root: Path, away_s: float, stranded_after_s: int
) -> None:
    """The replica of the sale's primary is cut off; ``away_s`` later, at once, the primary
    is split away alone and the replica comes back, for 10 s: the majority promotes a
    replica that never saw what the primary wrote meanwhile. None of that was confirmed by
    WAIT (503 OUTCOME_UNKNOWN) and the sweeper (after ``stranded_after_s``) had not
    published it: it is dropped, and no shopper may have been told yes about it."""
    folder = Path(tempfile.mkdtemp(dir=root, prefix="case-"))
    stack = await NetStack.start(net, pg, folder, stranded_after_s=stranded_after_s)
    try:
        sale = await Sale.open(stack, quantity=200, shoppers=600)
        key = rediskeys.sale(sale.id)
        primary = stack.primary_for(key)
        replica = stack.replica_of(primary)
        crowd = asyncio.create_task(shop(sale.shoppers, sale.id, per_second=200))
        try:
            await until(lambda: sale.accepted() >= 40, "the first joins accepted")
            net.cut(replica)
            await asyncio.sleep(away_s)
            net.split([primary])
            net.reconnect(replica)
            await asyncio.sleep(10)
            promoted = stack.primary_for(key, asking=replica)
            held = stack.log_ids(primary, [rediskeys.log(sale.id, 0)])
        finally:
            net.heal()
        healed_at = time.monotonic()
        await crowd
        await judged(
            f"the replica cut off {away_s} s, then the primary split away alone as it comes "
            "back, 10 s",
            stack,
            sale,
            sale.shoppers,
            healed_at,
            late=sale.late,
        )
        db = await create_pool(stack.settings.database, min_size=1, max_size=1)
        try:
            persisted = {r["id"] for r in await db.fetch(SQL_ORDER_IDS, sale.id)}
        finally:
            await db.close()
        dropped = held - persisted
        print(f"reservations only the old primary had, dropped at heal: {len(dropped)}")
        assert promoted == replica, "no failover on the majority side"
        assert not dropped & {s.order_id for s in sale.shoppers}
    finally:
        net.heal()
        stack.stop()
