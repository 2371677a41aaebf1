"""The load generator of the benchmark: wrk with a Lua script, or a bounded uvloop client.

Both send the same request shape: ``METHOD path`` with an optional JSON body and a
bearer token taken in turn from a tokens file (one token per line; each worker
thread or process starts at its own offset and strides, so users stay distinct
until the file wraps). Both report requests, req/s, p50, p99 and the count of each
status; an *error* is a socket error or a status that is not in ``expected``.

- :func:`run_wrk` drives ``wrk`` (Debian package ``wrk``) with ``wrk_tokens.lua``.
  Bounded by ``-d`` (time) and by a per-thread request cap in the script (count).
- :func:`run_python` starts ``processes`` separate processes of this module
  (``python -m loadtests.loadgen --spec JSON``), each running raw HTTP/1.1 keep-alive
  connections on uvloop, bounded by a deadline and a request cap, and merges their
  latency histograms. With ``rate`` set it is open-loop: each connection sends on a
  fixed schedule and latency is measured from the *intended* send time (no
  coordinated omission), which is how the p99-at-half-peak figure is taken.

Only 127.0.0.1 is ever targeted: the host is not a parameter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import orjson

HOST = "127.0.0.1"
WRK_SCRIPT = Path(__file__).with_name("wrk_tokens.lua")
_BUCKET_US = 10  # latency histogram resolution
_WRK_LINE = re.compile(r"^WRKJSON (.*)$", re.MULTILINE)


class LoadgenError(Exception):
    """The generator could not run (missing binary, crashed worker, bad output)."""


@dataclass
class RunResult:
    """One load run, as printed in the benchmark table."""

    requests: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    statuses: dict[str, int] = field(default_factory=dict)
    generator: str = ""
    last_accept_s: float = 0.0  # Python client with record: when the last 2xx arrived
    # CPU seconds the generator itself spent on the load (its start-up excluded): on cores
    # it shares with what it measures, the reader sees how much of them it took
    generator_cpu_s: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rps"] = round(self.rps, 1)
        return out


def _percentile(hist: Counter[int], q: float) -> float:
    """The q-quantile in ms of a histogram of ``_BUCKET_US`` buckets."""
    total = sum(hist.values())
    if total == 0:
        return 0.0
    rank = q * total
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return (bucket + 1) * _BUCKET_US / 1000.0
    return max(hist) * _BUCKET_US / 1000.0


def _count_errors(statuses: dict[str, int], expected: tuple[int, ...]) -> int:
    ok = {str(s) for s in expected}
    return sum(n for s, n in statuses.items() if s not in ok)


# ---------------------------------------------------------------- wrk


def wrk_binary(install: bool = True) -> str | None:
    """The wrk binary; when missing and we are root, try ``apt-get install -y wrk`` once."""
    found = shutil.which("wrk")
    if found or not install:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk is missing: trying apt-get install -y wrk", file=sys.stderr)
        for step in (
            ["apt-get", "install", "-y", "wrk"],
            ["apt-get", "update"],
            ["apt-get", "install", "-y", "wrk"],
        ):
            subprocess.run(step, capture_output=True, timeout=300, check=False)
            found = shutil.which("wrk")
            if found:
                break
    if not found:
        print(
            "wrk is NOT available (not installed and could not install it); "
            "falling back to the Python uvloop client",
            file=sys.stderr,
        )
    return found


def run_wrk(
    path: str,
    port: int,
    *,
    tokens_file: Path | None,
    method: str = "GET",
    body: bytes = b"",
    expected: tuple[int, ...] = (200,),
    threads: int = 2,
    connections: int = 64,
    duration_s: float = 5.0,
    max_requests: int = 2_000_000,
    timeout_s: float = 5.0,
) -> RunResult:
    """One wrk run; bounded by ``duration_s`` and ``max_requests``."""
    binary = wrk_binary()
    if binary is None:
        raise LoadgenError("wrk is not installed")
    per_thread = max(1, max_requests // threads)
    args = [
        binary,
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{max(1, round(duration_s))}s",
        "--timeout",
        f"{max(1, round(timeout_s))}s",
        "-s",
        str(WRK_SCRIPT),
        f"http://{HOST}:{port}{path}",
        "--",
        str(tokens_file or ""),
        method,
        body.decode(),
        str(per_thread),
        str(threads),
    ]
    before = _children_cpu_s()
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=duration_s + 60, check=False
    )
    generator_cpu_s = _children_cpu_s() - before
    match = _WRK_LINE.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        raise LoadgenError(
            f"wrk failed ({proc.returncode}): {proc.stderr.strip()[-500:]} "
            f"{proc.stdout.strip()[-500:]}"
        )
    data = json.loads(match.group(1))
    statuses = {str(k): int(v) for k, v in data["statuses"].items() if int(v) > 0}
    socket_errors = (
        int(data["connect"]) + int(data["read"]) + int(data["write"]) + int(data["timeout"])
    )
    if socket_errors:
        statuses["socket"] = socket_errors
    return RunResult(
        requests=int(data["requests"]),
        duration_s=float(data["duration_us"]) / 1e6,
        p50_ms=float(data["p50_us"]) / 1000.0,
        p99_ms=float(data["p99_us"]) / 1000.0,
        errors=_count_errors(statuses, expected),
        statuses=statuses,
        generator=f"wrk -t{threads} -c{connections}",
        generator_cpu_s=generator_cpu_s,
    )


def _children_cpu_s() -> float:
    """User + system CPU of this process's children that have been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------- python client


@dataclass
class Spec:
    """What one client process does."""

    port: int
    path: str
    method: str = "GET"
    body: str = ""
    tokens_file: str = ""
    token_offset: int = 0
    token_stride: int = 1
    connections: int = 32
    duration_s: float = 5.0
    max_requests: int = 1_000_000
    rate: float = 0.0  # requests per second for this process; 0 = as fast as possible
    record: str = ""  # write one outcome line per response here (see loadtests.invariants)
    result: str = ""  # write the run's figures here as JSON (else to standard output)


class _Client(asyncio.Protocol):
    """One keep-alive connection: send, read one response, record, repeat."""

    def __init__(self, run: _ProcessRun, slot: int) -> None:
        self.run = run
        self.slot = slot
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.sent_at = 0.0
        self.next_at = 0.0
        self.waiting = False
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's own class
        self.next_at = time.perf_counter() + self.run.phase(self.slot)
        self._schedule()

    def _schedule(self) -> None:
        if not self.run.may_send():
            self._close()
            return
        now = time.perf_counter()
        if self.run.interval and self.next_at > now:
            asyncio.get_running_loop().call_later(self.next_at - now, self._send)
        else:
            self._send()

    def _send(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if not self.run.may_send():
            self._close()
            return
        self.waiting = True
        # open-loop: latency counts from when the request was due, not when it left
        self.sent_at = self.next_at if self.run.interval else time.perf_counter()
        self.transport.write(self.run.next_request())

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = bytes(self.buf[:head_end])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            end = head_end + 4 + length
            if len(self.buf) < end:
                return
            status = head[9:12].decode()
            if self.run.outcomes is not None:
                self.run.note(status, bytes(self.buf[head_end + 4 : end]))
            del self.buf[:end]
            self.waiting = False
            self.run.record(status, time.perf_counter() - self.sent_at)
            if self.run.interval:
                self.next_at += self.run.interval
            self._schedule()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiting:
            self.waiting = False
            self.run.record("socket", time.perf_counter() - self.sent_at)
        if not self.closed.done():
            self.closed.set_result(None)

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class _ProcessRun:
    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        tokens: list[bytes] = []
        if spec.tokens_file:
            lines = Path(spec.tokens_file).read_bytes().split()
            tokens = lines[spec.token_offset :: spec.token_stride] or lines
        body = spec.body.encode()
        self.prefix = (
            f"{spec.method} {spec.path} HTTP/1.1\r\nHost: {HOST}:{spec.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        ).encode()
        self.suffix = b"\r\n" + body
        self.tokens = tokens
        self.next_token = 0
        self.sent = 0
        self.started = time.perf_counter()
        self.last_done = self.started
        self.deadline = time.perf_counter() + spec.duration_s
        self.interval = spec.connections / spec.rate if spec.rate > 0 else 0.0
        self.hist: Counter[int] = Counter()
        self.statuses: Counter[str] = Counter()
        self.outcomes: list[str] | None = [] if spec.record else None
        self.last_accept = 0.0

    def note(self, status: str, body: bytes) -> None:
        """One outcome line: ``accepted <order_id>`` or ``rejected <ERROR_CODE or status>``."""
        assert self.outcomes is not None
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None
        if status.startswith("2") and isinstance(data, dict) and isinstance(data.get("data"), dict):
            self.outcomes.append(f"accepted\t{data['data'].get('order_id')}")
            self.last_accept = time.perf_counter() - self.started
        else:
            reason = data.get("error") if isinstance(data, dict) else None
            self.outcomes.append(f"rejected\t{reason or 'HTTP_' + status}")

    def phase(self, slot: int) -> float:
        return self.interval * slot / self.spec.connections if self.interval else 0.0

    def may_send(self) -> bool:
        return self.sent < self.spec.max_requests and time.perf_counter() < self.deadline

    def next_request(self) -> bytes:
        self.sent += 1
        if not self.tokens:
            return self.prefix + self.suffix
        token = self.tokens[self.next_token]
        self.next_token = (self.next_token + 1) % len(self.tokens)
        return self.prefix + b"Authorization: Bearer " + token + b"\r\n" + self.suffix

    def record(self, status: str, latency_s: float) -> None:
        self.last_done = time.perf_counter()
        self.statuses[status] += 1
        self.hist[int(latency_s * 1e6) // _BUCKET_US] += 1


async def _run_process(spec: Spec) -> dict[str, Any]:
    cpu_at_start = time.process_time()
    run = _ProcessRun(spec)
    loop = asyncio.get_running_loop()
    clients: list[_Client] = []
    for slot in range(spec.connections):
        try:
            _, proto = await loop.create_connection(partial(_Client, run, slot), HOST, spec.port)
        except OSError:
            run.statuses["connect"] += 1
            continue
        clients.append(proto)
    if clients:
        await asyncio.wait([c.closed for c in clients], timeout=spec.duration_s + 10)
    for c in clients:
        c._close()
    return {
        "outcomes": run.outcomes or [],
        "statuses": dict(run.statuses),
        "hist": {str(k): v for k, v in run.hist.items()},
        "elapsed": run.last_done - run.started,
        "last_accept_s": run.last_accept,
        "cpu_s": time.process_time() - cpu_at_start,
    }


def run_python(
    path: str,
    port: int,
    *,
    tokens_file: Path | None,
    method: str = "GET",
    body: bytes = b"",
    expected: tuple[int, ...] = (200,),
    processes: int = 2,
    connections: int = 64,
    duration_s: float = 5.0,
    max_requests: int = 2_000_000,
    rate: float = 0.0,
    record: Path | None = None,
) -> RunResult:
    """Run ``processes`` client processes (``connections`` in total); merge what they saw."""
    per_conn = max(1, connections // processes)
    with tempfile.TemporaryDirectory(prefix="loadgen-") as results:
        return _run_children(
            [
                Spec(
                    port=port,
                    path=path,
                    method=method,
                    body=body.decode(),
                    tokens_file=str(tokens_file or ""),
                    token_offset=i,
                    token_stride=processes,
                    connections=per_conn,
                    duration_s=duration_s,
                    max_requests=max(1, max_requests // processes),
                    rate=rate / processes if rate else 0.0,
                    record=f"{record}.{i}" if record else "",
                    # a file, not a pipe: a long run's histogram is hundreds of KB, and
                    # one such answer through a pipe once came back cut at 64 KiB
                    result=str(Path(results) / f"result.{i}.json"),
                )
                for i in range(processes)
            ],
            expected,
            rate,
        )


def _run_children(specs: list[Spec], expected: tuple[int, ...], rate: float) -> RunResult:
    processes = len(specs)
    per_conn = specs[0].connections
    duration_s = specs[0].duration_s
    procs = []
    for spec in specs:
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "loadtests.loadgen", "--spec", json.dumps(asdict(spec))],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    hist: Counter[int] = Counter()
    statuses: Counter[str] = Counter()
    elapsed = last_accept = generator_cpu_s = 0.0
    try:
        for p, spec in zip(procs, specs, strict=True):
            _, err = p.communicate(timeout=duration_s + 60)
            if p.returncode != 0:
                raise LoadgenError(f"loadgen process failed: {err.strip()[-500:]}")
            data = json.loads(Path(spec.result).read_text())
            statuses.update(data["statuses"])
            hist.update({int(k): v for k, v in data["hist"].items()})
            elapsed = max(elapsed, float(data["elapsed"]))
            last_accept = max(last_accept, float(data["last_accept_s"]))
            generator_cpu_s += float(data["cpu_s"])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    mode = f"rate {rate:.0f}/s open-loop" if rate else "closed-loop"
    return RunResult(
        requests=sum(hist.values()),
        duration_s=elapsed,
        p50_ms=_percentile(hist, 0.50),
        p99_ms=_percentile(hist, 0.99),
        errors=_count_errors(dict(statuses), expected),
        statuses=dict(statuses),
        generator=f"python uvloop x{processes} procs, {per_conn * processes} conns, {mode}",
        last_accept_s=last_accept,
        generator_cpu_s=generator_cpu_s,
    )


def run(path: str, port: int, *, prefer_wrk: bool = True, **kwargs: Any) -> RunResult:
    """wrk when available (and no rate is asked), else the Python client."""
    rate = kwargs.pop("rate", 0.0)
    processes = kwargs.pop("processes", 2)
    if prefer_wrk and not rate and wrk_binary() is not None:
        return run_wrk(path, port, threads=processes, **kwargs)
    return run_python(path, port, processes=processes, rate=rate, **kwargs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", help="JSON Spec: run one client process and print JSON")
    p.add_argument("--port", type=int)
    p.add_argument("--path", default="/")
    p.add_argument("--method", default="GET")
    p.add_argument("--body", default="")
    p.add_argument("--tokens-file", type=Path)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--max-requests", type=int, default=2_000_000)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--python", action="store_true", help="use the Python client, not wrk")
    p.add_argument("--expect", default="200", help="comma-separated statuses that are not errors")
    args = p.parse_args(argv)
    if args.spec:
        import uvloop

        spec = Spec(**json.loads(args.spec))
        result = uvloop.run(_run_process(spec))
        outcomes = result.pop("outcomes")
        if spec.record:
            Path(spec.record).write_text("".join(line + "\n" for line in outcomes))
        if spec.result:
            Path(spec.result).write_text(json.dumps(result))
        else:
            print(json.dumps(result))
        return 0
    if args.port is None:
        p.error("--port is required")
    res = run(
        args.path,
        args.port,
        prefer_wrk=not args.python,
        tokens_file=args.tokens_file,
        method=args.method,
        body=args.body.encode(),
        expected=tuple(int(s) for s in args.expect.split(",")),
        connections=args.connections,
        duration_s=args.duration,
        max_requests=args.max_requests,
        rate=args.rate,
    )
    print(json.dumps(res.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
