"""Test hosts on one machine: one Linux network namespace per host, each with a veth link
to one bridge in the root namespace, which holds the bridge's own address (the shoppers and
the checker run there and reach every host).

Faults, all made with iproute2:

- ``cut(host)``: the host's bridge port goes down — it reaches no one and no one reaches it
  (the shoppers neither);
- ``sever(side_a, side_b)``: no packet passes between any host of one side and any host of
  the other, each side still whole and both still reachable by the shoppers (a split of
  the back-end network; a gateway on the minority side keeps taking requests). Each host
  of a side gets a permanent neighbour entry with a MAC nobody owns for each host of the
  other, so frames are sent and silently lost, as across a broken switch: connections
  hang and time out, none is refused;
- ``heal()``: every fault undone.

A process runs on a host when it is started inside ``inside(host)``: the calling thread
enters the host's namespace (``setns``), so a child started there lives in it, and so do
the sockets the thread opens meanwhile (the readiness checks of the embedded servers).

Clocks: network namespaces share the machine's clocks. A time namespace
(``unshare --time``) offsets only CLOCK_MONOTONIC and CLOCK_BOOTTIME, is fixed before its
first process starts, and cannot offset CLOCK_REALTIME (kernel ``time_namespaces(7)``;
measured here: ``unshare --time --monotonic 3600`` works, there is no realtime option), so a
wall-clock step on one gateway host cannot be made on one machine: ``date -s`` in a
namespace steps every host. The clock-step case is left to real machines.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import secrets
import signal
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

CLONE_NEWNET = 0x40000000
UNOWNED_MAC = "02:00:00:00:fa:11"  # locally administered, owned by no interface here
IFACE = "eth0"
OWNER = "flashsale-netns pid="  # the bridge's alias: which test process made this network


class NamespacesUnavailable(Exception):
    """Network namespaces cannot be made here (not root, no iproute2, no CAP_NET_ADMIN)."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they can (probed by making one)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = "fsprobe" + secrets.token_hex(3)
    try:
        made = ip("netns", "add", probe, check=False)
    except FileNotFoundError:
        return "iproute2's ip is not installed (make netns installs it)"
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass
class Host:
    name: str
    netns: str
    ip: str
    port: str  # the bridge-side end of its veth, in the root namespace


@dataclass
class Network:
    """Hosts over one bridge; ``stop`` removes every namespace and link it made."""

    tag: str
    bridge: str
    gateway_ip: str  # the bridge's own address: the root namespace on this network
    hosts: dict[str, Host] = field(default_factory=dict)
    severed: set[tuple[str, str]] = field(default_factory=set)
    cut_hosts: set[str] = field(default_factory=set)

    @classmethod
    def build(cls, names: Iterable[str]) -> Network:
        reason = unavailable_reason()
        if reason:
            raise NamespacesUnavailable(reason)
        sweep_leftovers()
        tag = "fs" + secrets.token_hex(2)
        subnet = _free_subnet()
        addresses = list(subnet.hosts())
        net = cls(tag, tag + "br", str(addresses[0]))
        try:
            ip("link", "add", net.bridge, "type", "bridge")
            ip("link", "set", net.bridge, "alias", f"{OWNER}{os.getpid()}")
            ip("addr", "add", f"{net.gateway_ip}/{subnet.prefixlen}", "dev", net.bridge)
            ip("link", "set", net.bridge, "up")
            for i, name in enumerate(names):
                host = Host(name, f"{tag}-{name}", str(addresses[i + 1]), f"{tag}h{i}")
                ip("netns", "add", host.netns)
                ip(
                    "link",
                    "add",
                    host.port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    IFACE,
                    "netns",
                    host.netns,
                )
                ip("link", "set", host.port, "master", net.bridge, "up")
                ip("-n", host.netns, "addr", "add", f"{host.ip}/{subnet.prefixlen}", "dev", IFACE)
                ip("-n", host.netns, "link", "set", IFACE, "up")
                ip("-n", host.netns, "link", "set", "lo", "up")
                net.hosts[name] = host
        except BaseException:
            net.stop()
            raise
        return net

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    @contextlib.contextmanager
    def inside(self, name: str) -> Iterator[Host]:
        """The calling thread in ``name``'s namespace: children started now run there (what
        ``ip netns exec`` does, without a wrapper process). Never held across an ``await``:
        every coroutine of the loop would open its sockets there meanwhile."""
        host = self.hosts[name]
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{host.netns}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield host
            finally:
                _setns(own)
        finally:
            os.close(target)
            os.close(own)

    def cut(self, name: str) -> None:
        ip("link", "set", self.hosts[name].port, "down")
        self.cut_hosts.add(name)

    def reconnect(self, name: str) -> None:
        """Undo ``cut(name)`` only (other faults stay)."""
        ip("link", "set", self.hosts[name].port, "up")
        self.cut_hosts.discard(name)

    def sever(self, side_a: Iterable[str], side_b: Iterable[str]) -> None:
        b = list(side_b)
        for x in side_a:
            for y in b:
                self._blind(x, y)
                self._blind(y, x)

    def _blind(self, x: str, y: str) -> None:
        hx, hy = self.hosts[x], self.hosts[y]
        ip(
            "-n",
            hx.netns,
            "neigh",
            "replace",
            hy.ip,
            "lladdr",
            UNOWNED_MAC,
            "nud",
            "permanent",
            "dev",
            IFACE,
        )
        self.severed.add((x, y))

    def split(self, side: Iterable[str]) -> list[str]:
        """``side`` apart from every other host; returns the other side."""
        inside = set(side)
        rest = [n for n in self.hosts if n not in inside]
        self.sever(inside, rest)
        return rest

    def heal(self) -> None:
        for name in sorted(self.cut_hosts):
            ip("link", "set", self.hosts[name].port, "up")
        self.cut_hosts.clear()
        for x, y in sorted(self.severed):
            ip(
                "-n",
                self.hosts[x].netns,
                "neigh",
                "del",
                self.hosts[y].ip,
                "dev",
                IFACE,
                check=False,
            )
        self.severed.clear()

    def stop(self) -> None:
        for host in self.hosts.values():
            ip("netns", "del", host.netns, check=False)  # takes its veth (and the peer) along
        ip("link", "del", self.bridge, check=False)
        self.hosts.clear()


def sweep_leftovers() -> None:
    """Remove what a run that died without cleaning up left behind (its bridge names the
    test process that made it): the processes still in its namespaces, the namespaces, the
    bridge. Another run's network, still alive, is left alone."""
    bridges = json.loads(ip("-j", "link", "show", "type", "bridge").stdout or "[]")
    names = ip("netns", "list").stdout.split()
    for bridge in bridges:
        alias = bridge.get("ifalias", "")
        if not alias.startswith(OWNER) or Path(f"/proc/{alias[len(OWNER) :]}").exists():
            continue
        tag = bridge["ifname"].removesuffix("br")
        for netns in [n for n in names if n.startswith(tag + "-")]:
            for pid in ip("netns", "pids", netns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            ip("netns", "del", netns, check=False)
        ip("link", "del", bridge["ifname"], check=False)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.213.0.0/16 that no route of this machine covers (other runs at once)."""
    used = ip("-4", "route", "show", "table", "all").stdout
    for _ in range(50):
        candidate = ipaddress.IPv4Network(f"10.213.{secrets.randbelow(250) + 1}.0/24")
        if str(candidate.network_address)[:-2] not in used:
            return candidate
    raise NamespacesUnavailable("no free 10.213.x.0/24 for the test network")
