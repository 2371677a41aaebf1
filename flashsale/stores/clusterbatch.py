"""The join path's auto-pipelining on a Redis Cluster: one :class:`ScriptBatcher` per primary.

Each call is routed by the slot of its first key (every key of one script shares a hash
tag, so one slot) to the batcher of the primary that serves the slot; each primary still
gets one write per event-loop tick carrying all of that tick's calls for it, and each
call's ``with_run_id`` carries the run id of that primary.

The slot map comes from ``CLUSTER SLOTS``, asked of every node the batcher has seen (each
primary and replica a map listed, each ``MOVED`` target) and of every seed node, until one
answers with every slot served: a gateway outlives the node it was configured with. A map
is replaced whole, only by a full one, so it is never left partial; a call that finds no
owner for its slot (no map read yet, no node reachable) is not sent (:class:`NoOwner`) and
the map is read again. A ``MOVED`` reply (the slot moved, or a
replica was promoted) updates the map and sends the call again to the named node; ``ASK``
(a slot being migrated) sends it there once with ``ASKING``; ``TRYAGAIN`` and
``CLUSTERDOWN`` refresh the map and try again. Resending is safe: a redirected script did
not run. A call that was never sent (:class:`NotSent`, e.g. its primary is down) is tried
again after a refresh of the map; one whose outcome is unknown is not (the caller must
not say "no"), but the map is refreshed for the next calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import quote, unquote, urlsplit

import hiredis
from redis.commands.core import AsyncScript
from redis.crc import key_slot
from redis.exceptions import ResponseError

from flashsale.stores.redisbatch import (
    MAX_BATCH,
    NotSent,
    OutcomeUnknown,
    ScriptBatcher,
    pack,
)
from flashsale.timing import (
    CLUSTER_SLOTS_NODE_TIMEOUT_S,
    CLUSTER_SLOTS_REFRESH_MIN_S,
    REDIS_BATCH_TIMEOUT_S,
)

SLOTS: Final = 16384
ATTEMPTS: Final = 4
PIPELINES_WITH_WAIT: Final = 4
REDIRECTS: Final = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")


def _redirect(exc: ResponseError) -> tuple[str, str] | None:
    """(kind, "host:port") of a cluster redirection reply, or None for any other error."""
    parts = str(exc).split()
    if not parts or parts[0] not in REDIRECTS:
        return None
    return parts[0], parts[2] if len(parts) > 2 else ""


class NoOwner(NotSent):
    """No node is known to serve the call's slot: it was not sent (retry later)."""


def _addr(host: str, port: int) -> str:
    return f"{host}:{port}"


class ClusterScriptBatcher:
    """:class:`ScriptBatcher`'s ``call`` on a Redis Cluster, routed by slot."""

    def __init__(
        self,
        seeds: Sequence[str],
        *,
        max_batch: int = MAX_BATCH,
        timeout_s: float = REDIS_BATCH_TIMEOUT_S,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 500,
    ) -> None:
        first = urlsplit(seeds[0])
        self._username = unquote(first.username) if first.username else None
        self._password = unquote(first.password) if first.password else None
        self._seeds = [f"{urlsplit(u).hostname}:{urlsplit(u).port or 6379}" for u in seeds]
        self._options: dict[str, Any] = {
            "max_batch": max_batch,
            "timeout_s": timeout_s,
            "wait_replicas": wait_replicas,
            "wait_timeout_ms": wait_timeout_ms,
        }
        self._timeout_s = timeout_s
        self._slots: list[str] = []
        # every node any map listed (primaries and replicas) or a MOVED named, oldest first
        self._known: dict[str, None] = {}
        self._listed: list[str] = []  # the nodes the current map lists
        self._unreachable: set[str] = set()  # nodes the last refresh could not ask
        # WAIT blocks its connection until the replica acknowledges: with it, a primary gets
        # a few connections, and each tick's calls go to one that is not waiting
        self._per_node = PIPELINES_WITH_WAIT if wait_replicas else 1
        self._nodes: dict[str, list[ScriptBatcher]] = {}
        self._refreshing: asyncio.Lock | None = None
        self._refreshed_at = 0.0
        self._background: set[asyncio.Task[None]] = set()
        self.refreshes = 0

    @property
    def round_trips(self) -> int:
        return sum(b.round_trips for pool in self._nodes.values() for b in pool)

    @property
    def calls(self) -> int:
        return sum(b.calls for pool in self._nodes.values() for b in pool)

    def _url(self, addr: str) -> str:
        cred = ""
        if self._password is not None:
            user = quote(self._username, safe="") if self._username else ""
            cred = f"{user}:{quote(self._password, safe='')}@"
        return f"redis://{cred}{addr}/0"

    def node(self, addr: str) -> ScriptBatcher:
        """The connection to ``addr`` the next call goes on: the first one idle (or the
        least busy), so that the calls of one tick share one write."""
        pool = self._nodes.get(addr)
        if pool is None:
            url = self._url(addr)
            pool = self._nodes[addr] = [
                ScriptBatcher(url, **self._options) for _ in range(self._per_node)
            ]
        if len(pool) == 1:
            return pool[0]
        return min(pool, key=lambda b: b.in_flight)

    def node_for(self, key: str) -> str:
        """The address of the primary serving ``key``'s slot, as last known; :class:`NoOwner`
        when none is known."""
        return self._owner(key_slot(key.encode()))

    def _owner(self, slot: int) -> str:
        slots = self._slots
        if not slots or not slots[slot]:
            raise NoOwner(f"no known Redis Cluster node serves slot {slot}")
        return slots[slot]

    @property
    def known_nodes(self) -> list[str]:
        """Every node a slot map or a ``MOVED`` named, and the seeds: whom a refresh asks."""
        return list(dict.fromkeys([*self._known, *self._seeds]))

    def _candidates(self) -> list[str]:
        """Whom a refresh asks, in order: the nodes the current map lists (shuffled, so
        that workers do not all ask one node), the seeds, any other node seen, and last
        those the previous refresh could not reach."""
        listed = list(self._listed)
        random.shuffle(listed)
        order = dict.fromkeys([*listed, *self._seeds, *self._known])
        return [a for a in order if a not in self._unreachable] + [
            a for a in order if a in self._unreachable
        ]

    async def _slot_map(self, addr: str) -> tuple[list[str], list[str]]:
        """``addr``'s answer to CLUSTER SLOTS: each slot's primary ("" where none), and
        every node the answer lists."""
        host, _, port = addr.rpartition(":")
        timeout_s = min(self._timeout_s, CLUSTER_SLOTS_NODE_TIMEOUT_S)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout_s)
        try:
            commands = []
            if self._password is not None:
                auth = [self._username, self._password] if self._username else [self._password]
                commands.append(pack(["AUTH", *auth]))
            commands.append(pack(["CLUSTER", "SLOTS"]))
            writer.write(b"".join(commands))
            parser = hiredis.Reader()
            replies: list[Any] = []
            while len(replies) < len(commands):
                data = await asyncio.wait_for(reader.read(65536), timeout_s)
                if not data:
                    raise ConnectionError(f"{addr} closed the connection")
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    if isinstance(reply, hiredis.ReplyError):
                        raise ResponseError(str(reply))
                    replies.append(reply)
        finally:
            writer.close()
        slots = [""] * SLOTS
        nodes: dict[str, None] = {}
        for entry in replies[-1]:
            start, end = int(entry[0]), int(entry[1])
            # [host, port, id, ...] for the primary, then each replica; an empty host
            # is the answering node's own
            served = [_addr(n[0].decode() or host, int(n[1])) for n in entry[2:]]
            nodes.update(dict.fromkeys(served))
            slots[start : end + 1] = [served[0]] * (end - start + 1)
        return slots, list(nodes)

    async def refresh(self, *, force: bool = False) -> None:
        """Read the slot map from the first node that answers with every slot served (see
        :meth:`_candidates` for the order); :class:`NotSent` if none does, the map kept."""
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        seen_at = self._refreshed_at
        async with self._refreshing:
            if self._refreshed_at != seen_at and not force:
                return  # another caller refreshed while this one waited
            wait = CLUSTER_SLOTS_REFRESH_MIN_S - (time.monotonic() - self._refreshed_at)
            if wait > 0:
                await asyncio.sleep(wait)
            errors: list[str] = []
            unreachable: set[str] = set()
            for addr in self._candidates():
                try:
                    slots, nodes = await self._slot_map(addr)
                except (OSError, TimeoutError, ResponseError, ConnectionError) as exc:
                    errors.append(f"{addr}: {exc!r}")
                    unreachable.add(addr)
                    continue
                if "" in slots:  # a node that lost sight of a primary: ask another
                    errors.append(f"{addr}: {slots.count('')} slots not served")
                    continue
                self._slots = slots  # whole, never partial
                self._listed = nodes
                self._known.update(dict.fromkeys(nodes))
                self._unreachable = unreachable
                self._refreshed_at = time.monotonic()
                self.refreshes += 1
                return
            self._unreachable = unreachable
            self._refreshed_at = time.monotonic()
            raise NotSent("no Redis Cluster node gave a full slot map: " + "; ".join(errors))

    async def connect(self) -> None:
        """Read the slot map and connect to every primary."""
        if not self._slots:
            await self.refresh()
        for addr in set(self._slots):
            self.node(addr)
            for batcher in self._nodes[addr]:
                await batcher.connect()

    async def call(
        self,
        script: AsyncScript,
        keys: Sequence[str],
        args: Sequence[Any],
        *,
        with_run_id: bool = False,
    ) -> Any:
        """EVALSHA ``script`` on the primary serving ``keys[0]``; see the module docstring."""
        slot = key_slot(keys[0].encode())
        addr: str | None = None
        asking = False
        for attempt in range(ATTEMPTS):
            try:
                if addr is None:
                    addr = self._owner(slot)
                return await self.node(addr).call(
                    script, keys, args, with_run_id=with_run_id, asking=asking
                )
            except NotSent:
                if attempt == ATTEMPTS - 1:
                    self._refresh_soon()  # for the caller's retry
                    raise
                await self.refresh()
                addr, asking = None, False
            except OutcomeUnknown:
                self._refresh_soon()
                raise
            except ResponseError as exc:
                redirect = _redirect(exc)
                if redirect is None or attempt == ATTEMPTS - 1:
                    raise
                kind, target = redirect
                if kind == "MOVED":
                    self._known[target] = None
                    if self._slots:
                        self._slots[slot] = target
                    addr, asking = target, False
                    self._refresh_soon()
                elif kind == "ASK":
                    self._known[target] = None
                    addr, asking = target, True
                else:
                    await self.refresh(force=True)
                    addr, asking = None, False
        raise AssertionError("unreachable")

    def _refresh_soon(self) -> None:
        if self._background:
            return  # one is under way
        task = asyncio.get_running_loop().create_task(self._refresh_quietly())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refresh_quietly(self) -> None:
        with contextlib.suppress(NotSent):  # the next call that needs the map tries again
            await self.refresh()

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for batcher in [b for pool in self._nodes.values() for b in pool]:
            await batcher.close()
