"""Where a join's CPU goes: py-spy on the gateway workers under the bench's load, by stage.

    .venv/bin/python -m loadtests.profile_join [--scenario accept] [--seconds 10]

Starts the bench's isolated stack and gateway (:func:`loadtests.bench.start_env`: 2
workers, access log off, rate limits far above the load), creates a sale for the
scenario, warms up, then drives wrk (2 threads, 64 connections) for ``--seconds`` while
``py-spy record --nonblocking`` samples every gateway worker. It prints the rate, the CPU
per request of each process (user + system from ``/proc``, over exactly the measured
window) and the workers' samples by stage, each stage as a share and as microseconds per
request. A sample is put in the stage of its innermost frame that belongs to a known
layer, so a stage holds its own code and the untracked calls below it (stdlib, C).

Scenarios: ``accept`` (a join with stock to spare, 202), ``soldout`` (409),
``notstarted`` (a sale not yet started, 409), ``poll`` (a queued sale's waiting room polled
with a ticket, 200, as the bench's row 4q), ``shed`` (a guest's cart write refused 503 with
shed-storefront on, what row 10c's storefront costs) and ``ceiling`` (the bench's row 1: bare
aiohttp on the same worker setup answering a fixed body, the floor a join is held to).
Every request goes to 127.0.0.1; every run is bounded by ``--seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import orjson

from flashsale.settings import Settings
from loadtests import loadgen
from loadtests.bench import (
    JOIN_BODY,
    QUICK,
    SHED_PLAN,
    STOREFRONT_WRITE,
    WORKERS,
    Env,
    _api,
    _cpu_s,
    _join_path,
    _spawn,
    _syscalls,
    _wait_http,
    _wait_until,
    create_sale,
    queued_ticket,
    start_env,
)
from stack import free_port, stop_children

CONNECTIONS = 64
SCENARIOS = ("accept", "soldout", "notstarted", "poll", "shed", "ceiling")
THREADS = 2
# py-spy is a project dependency installed beside this interpreter, not on PATH
PY_SPY = Path(sys.executable).with_name("py-spy")

# (stage, pattern on a frame's file), innermost match wins; order breaks ties in a frame
STAGES: tuple[tuple[str, str], ...] = (
    ("kafka produce (aiokafka)", r"aiokafka/|flashsale/stores/kafka"),
    ("redis batcher", r"flashsale/stores/(redisbatch|clusterbatch)"),
    ("redis-py (other Redis calls)", r"/redis/"),
    ("event encoding", r"flashsale/flash/events"),
    ("join domain", r"flashsale/flash/join"),
    ("flash cache/runtime", r"flashsale/flash/|gateway/flash_runtime"),
    ("waiting room", r"flashsale/waitingroom/"),
    ("authentication", r"flashsale/auth|gateway/auth|flashsale/sessions|/jwt/"),
    ("validation", r"gateway/validation"),
    ("metrics", r"flashsale/stores/metrics|prometheus_client"),
    ("order ids", r"flashsale/stores/ids"),
    ("envelope / errors", r"gateway/http\.py|flashsale/errors"),
    ("route handler", r"gateway/routes/"),
    ("join on the connection (framing, answer)", r"gateway/fastjoin|/httptools/"),
    ("middlewares", r"gateway/middlewares|gateway/routing"),
    ("access log / logging", r"/logging/|stack/logs"),
    ("aiohttp response", r"aiohttp/(web_response|http_writer|helpers|abc)"),
    ("aiohttp request / routing", r"aiohttp/(web_request|web_urldispatcher|web_app|multidict)"),
    ("aiohttp protocol / parser", r"aiohttp/(web_protocol|http_parser|base_protocol|streams)"),
    ("asyncio streams", r"asyncio/(streams|transports)"),
)
_FRAME = re.compile(r"\((?P<file>[^()]*?):\d+\)$")


@dataclass
class Profile:
    samples: int
    by_stage: dict[str, int]

    def table(self, cpu_us_per_request: float) -> str:
        lines = ["| stage | share | µs per request |", "|---|---:|---:|"]
        for stage, count in sorted(self.by_stage.items(), key=lambda kv: -kv[1]):
            share = count / self.samples if self.samples else 0.0
            lines.append(f"| {stage} | {share:.1%} | {share * cpu_us_per_request:.1f} |")
        return "\n".join(lines)


def classify(stack: list[str]) -> str:
    """The stage of one sampled stack (outermost frame first)."""
    for frame in reversed(stack):
        match = _FRAME.search(frame)
        path = match.group("file") if match else frame
        for stage, pattern in STAGES:
            if re.search(pattern, path):
                return stage
    return "event loop (uvloop I/O, scheduling)"


IO_LEAF = "I/O calls and the loop's own wait (kernel, libuv)"
_LEAF = re.compile(r"\((?P<file>[^()]*?):(?P<line>\d+)\)$")


def _is_io_leaf(frame: str, sources: dict[str, list[str]]) -> bool:
    """A sample whose innermost Python frame is a socket write or the loop's run: py-spy
    counts a worker that is runnable but waiting for a core as busy, and on a shared
    machine that wait lands right after a write that woke another process. These samples
    are priced by perf's kernel and libuv share instead (see :func:`main`)."""
    if frame.startswith("Runner.run "):
        return True
    match = _LEAF.search(frame)
    if match is None:
        return False
    path = match.group("file")
    if path not in sources:
        sources[path] = []
        # py-spy names a module's file relative to its sys.path entry
        for base in ("", *sys.path):
            candidate = Path(base) / path
            if candidate.is_file():
                sources[path] = candidate.read_text(errors="replace").splitlines()
                break
    lines = sources[path]
    number = int(match.group("line"))
    text = lines[number - 1] if 0 < number <= len(lines) else ""
    return ".write(" in text or ".writelines(" in text or "_writelines(" in text


def read_raw(paths: list[Path], *, split_io: bool = False) -> Profile:
    """py-spy's ``--format raw`` files (one ``frame;frame;... count`` line per stack);
    with ``split_io``, samples that end in a write or the loop's run form one stage."""
    by_stage: collections.Counter[str] = collections.Counter()
    sources: dict[str, list[str]] = {}
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = stack.split(";")[1:]  # the first is the thread
            if split_io and frames and _is_io_leaf(frames[-1], sources):
                by_stage[IO_LEAF] += int(count)
            else:
                by_stage[classify(frames)] += int(count)
    return Profile(sum(by_stage.values()), dict(by_stage))


# perf's shared objects, named by what they are
LIBRARIES: tuple[tuple[str, str], ...] = (
    ("kernel (system calls, TCP, scheduling)", r"kernel|vmlinux|\[vdso\]"),
    ("uvloop (libuv, transports)", r"uvloop|loop\.cpython"),
    ("aiohttp C parser and helpers", r"aiohttp|_http_parser|_http_writer|_websocket"),
    ("multidict / yarl / propcache", r"multidict|yarl|_quoting|propcache"),
    ("hiredis", r"hiredis"),
    ("orjson", r"orjson"),
    ("libc / libm", r"libc|libm|ld-linux"),
    ("Python interpreter", r"python|libpython"),
)


def _perf_record(data: Path, pids: list[int], seconds: float) -> subprocess.Popen[bytes] | None:
    """``perf record`` on the workers over the window, where perf runs (root, Linux): it
    counts CPU cycles only, so unlike py-spy's samples it does not count a worker that is
    runnable but waiting for a core (which py-spy charges to the system call that woke
    another process: the response write, the produce request)."""
    binary = shutil.which("perf")
    if binary is None or not pids:
        return None
    return subprocess.Popen(
        [
            *(binary, "record", "-F", "997", "-o", str(data)),
            *("-p", ",".join(map(str, pids)), "--", "sleep", str(int(seconds) + 1)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _perf_by_library(
    perf: subprocess.Popen[bytes] | None, data: Path, seconds: float
) -> dict[str, float]:
    """Share of the workers' CPU cycles per library (``perf report --sort dso``)."""
    if perf is None:
        return {}
    perf.wait(timeout=seconds + 30)
    binary = shutil.which("perf")
    if binary is None or not data.exists():
        return {}
    report = subprocess.run(
        [binary, "report", "-i", str(data), "--stdio", "--sort", "dso", "--no-children"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    shares: dict[str, float] = {}
    for line in report.splitlines():
        match = re.match(r"\s*([\d.]+)%\s+(\S.*)$", line)
        if not match:
            continue
        dso = match.group(2).strip()
        name = next((n for n, pattern in LIBRARIES if re.search(pattern, dso)), "other")
        shares[name] = shares.get(name, 0.0) + float(match.group(1))
    return shares


def _priced_table(profile: Profile, libraries: dict[str, float], cpu_us: float) -> str:
    """The stages with the I/O samples priced by perf: perf's kernel and libuv share of the
    CPU is the I/O stage, the rest is shared by the Python stages in py-spy's proportions."""
    if not libraries or not profile.samples:
        return ""
    io_share = (libraries.get(LIBRARIES[0][0], 0.0) + libraries.get(LIBRARIES[1][0], 0.0)) / 100
    python = {k: v for k, v in profile.by_stage.items() if k != IO_LEAF}
    total = sum(python.values()) or 1
    rows = [(IO_LEAF + " [perf]", io_share)]
    rows += [(k, (1 - io_share) * v / total) for k, v in python.items()]
    lines = ["| stage | share of CPU | µs per request |", "|---|---:|---:|"]
    for stage, share in sorted(rows, key=lambda kv: -kv[1]):
        lines.append(f"| {stage} | {share:.1%} | {share * cpu_us:.1f} |")
    return "\n".join(lines)


def _workers(parent: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(parent)], capture_output=True, text=True, check=False
    )
    return [int(p) for p in out.stdout.split()]


def _sale_for(env: Env, scenario: str) -> tuple[str, str, bytes, tuple[int, ...]]:
    """(method, path, body, expected statuses) of the scenario, its sale created."""
    if scenario == "accept":
        sale_id, start = create_sale(env, 100_000_000, 1_000_000)
        _wait_until(start)
        return "POST", _join_path(sale_id), JOIN_BODY, (202,)
    if scenario == "soldout":
        sale_id, start = create_sale(env, 1, 1)
        _wait_until(start)
        token = env.tokens_file.read_text().split()[0]
        asyncio.run(_api("POST", env.gateway_url + _join_path(sale_id), token, {"quantity": 1}))
        return "POST", _join_path(sale_id), JOIN_BODY, (409,)
    if scenario == "notstarted":
        sale_id, _ = create_sale(env, 1_000, 1, starts_in_s=3600)
        return "POST", _join_path(sale_id), JOIN_BODY, (409,)
    if scenario == "poll":  # a queued sale's waiting shopper, as the bench's row 4q (no token)
        return "GET", queued_ticket(env), b"", (200,)
    if scenario == "shed":  # a guest's cart write with shed-storefront on, as row 10c's
        status, data = asyncio.run(
            _api(
                "PUT",
                env.gateway_url + SHED_PLAN,
                env.admin_token,
                {"mode": "on", "confirm": "shed-storefront", "reason": "profile_join"},
            )
        )
        if status != 200:
            raise ValueError(f"switching shed-storefront on answered {status}: {data}")
        time.sleep(1.0)  # in force on every worker within a second
        return "POST", STOREFRONT_WRITE, orjson.dumps({"sku_id": env.sku_id, "quantity": 1}), (503,)
    if scenario == "ceiling":  # the floor: bare aiohttp answering a fixed body, same workers
        return "POST", "/", JOIN_BODY, (200,)
    raise ValueError(scenario)


def _target(env: Env, scenario: str) -> tuple[int, int]:
    """(port, supervisor pid) of the process tree the scenario loads."""
    if scenario != "ceiling":
        return env.settings.http_port, env.procs["gateway"].pid
    port = free_port()
    child = _spawn(
        env,
        "ceiling",
        [sys.executable, "-m", "loadtests.ceiling", "--port", str(port), "--workers", str(WORKERS)],
    )
    _wait_http(f"http://127.0.0.1:{port}/", child)
    return port, child.pid


def run(
    scenario: str,
    seconds: float,
    rate_hz: int,
    out: Path | None,
    overrides: dict[str, Any] | None = None,
    load_rate: float = 0.0,
) -> dict[str, object]:
    root = Path(tempfile.mkdtemp(prefix="flashsale-profile-"))
    stack, env = start_env(root, QUICK, "always", overrides)
    try:
        method, path, body, expected = _sale_for(env, scenario)
        load: dict[str, Any] = {
            "tokens_file": None if scenario in ("poll", "shed") else env.tokens_file,
            "method": method,
            "body": body,
            "expected": expected,
            "connections": CONNECTIONS,
            "processes": THREADS,
            "max_requests": 50_000_000,
        }
        port, parent = _target(env, scenario)
        loadgen.run(path, port, duration_s=2.0, **load)  # warm-up: caches, scripts, JIT-free
        pids = {"gateway": parent}
        pids |= {name: stack.get(name).proc.pid for name in ("redis", "kafka", "postgres")}
        spies = []
        raws = [root / f"spy-{pid}.raw" for pid in _workers(pids["gateway"])]
        for raw in raws:
            pid = raw.stem.split("-")[1]
            spies.append(
                subprocess.Popen(
                    [
                        *(str(PY_SPY), "record", "--nonblocking", "--format", "raw"),
                        *("-r", str(rate_hz), "-d", str(int(seconds) + 1)),
                        *("-p", pid, "-o", str(raw)),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        perf = _perf_record(root / "perf.data", [int(r.stem.split("-")[1]) for r in raws], seconds)
        time.sleep(0.5)  # py-spy attached
        before = {name: _cpu_s(pid) for name, pid in pids.items()}
        calls_before = _syscalls(parent)
        result = loadgen.run(path, port, duration_s=seconds, rate=load_rate, **load)
        cpu = {name: _cpu_s(pid) - before[name] for name, pid in pids.items()}
        calls = [after - was for after, was in zip(_syscalls(parent), calls_before, strict=True)]
        for spy in spies:
            spy.wait(timeout=seconds + 30)
        libraries = _perf_by_library(perf, root / "perf.data", seconds)
        python_only = read_raw([r for r in raws if r.exists()], split_io=True)
        requests = max(1, result.requests)
        per_request = {name: round(s * 1e6 / requests, 1) for name, s in cpu.items()}
        profile = read_raw([r for r in raws if r.exists()])
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            for raw in raws:
                if raw.exists():
                    shutil.copy(raw, out / f"{scenario}-{raw.name}")
        return {
            "scenario": scenario,
            "rps": round(result.rps, 1),
            "p50_ms": result.p50_ms,
            "p99_ms": result.p99_ms,
            "errors": result.errors,
            "statuses": result.statuses,
            "cpu_us_per_request": per_request,
            "gateway_syscalls_per_request": {
                "read": round(calls[0] / requests, 2),
                "write": round(calls[1] / requests, 2),
            },
            "samples": profile.samples,
            "by_stage": profile.by_stage,
            "table": profile.table(per_request["gateway"]),
            "by_library": libraries,
            "python_table": _priced_table(python_only, libraries, per_request["gateway"]),
        }
    finally:
        stop_children(list(env.procs.values()))
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)


def _setting(item: str) -> tuple[str, Any]:
    """``name=value`` typed like the setting's default."""
    name, _, text = item.partition("=")
    field = {f.name: f for f in fields(Settings)}.get(name)
    if field is None:
        raise SystemExit(f"--set: no setting named {name!r}")
    current = getattr(Settings.from_env({}), name)
    if isinstance(current, bool):
        return name, text.lower() in ("1", "true", "yes", "on")
    if isinstance(current, int | float):
        return name, type(current)(text)
    return name, text


def compare(
    scenario: str,
    spec: str,
    runs: int,
    seconds: float,
    rate_hz: int,
    overrides: dict[str, Any],
    load_rate: float = 0.0,
) -> str:
    """Runs with one setting at each of its values, alternating so that every value meets
    the same neighbours on a shared machine; a Markdown table of the medians (and the
    spread) and, for each value, the stages of its median run."""
    name, _, values = spec.partition("=")
    settings = [_setting(f"{name}={value}") for value in values.split(",")]
    results: dict[str, list[dict[str, Any]]] = {value: [] for _, value in settings}
    for _ in range(runs):
        for key, value in settings:
            results[value].append(
                run(scenario, seconds, rate_hz, None, overrides | {key: value}, load_rate)
            )
    lines = [
        f"| {name} | req/s (median, min–max) | gateway CPU µs/req (min–max) | Redis | broker "
        "| writes/req |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    tables = []
    for value, done in results.items():
        ordered = sorted(done, key=lambda r: r["cpu_us_per_request"]["gateway"])
        middle = ordered[len(ordered) // 2]
        rps = sorted(r["rps"] for r in done)
        cpu = [r["cpu_us_per_request"]["gateway"] for r in ordered]
        lines.append(
            f"| {value} | {statistics.median(rps):,.0f} ({rps[0]:,.0f}–{rps[-1]:,.0f}) "
            f"| {statistics.median(cpu):.1f} ({cpu[0]:.1f}–{cpu[-1]:.1f}) "
            f"| {middle['cpu_us_per_request']['redis']} | {middle['cpu_us_per_request']['kafka']} "
            f"| {middle['gateway_syscalls_per_request']['write']} |"
        )
        tables.append(
            f"\n{scenario}, {name}={value}: the median run "
            f"({middle['rps']:,.0f} req/s, gateway {middle['cpu_us_per_request']['gateway']} "
            f"µs/request), stages priced by perf\n\n{middle['python_table']}"
        )
    return "\n".join(lines) + "\n" + "\n".join(tables)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", default="accept", choices=SCENARIOS)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--out", type=Path, help="keep the raw py-spy files in this folder")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a gateway setting for this run (e.g. kafka_linger_ms=2), to price it",
    )
    p.add_argument(
        "--compare",
        metavar="NAME=A,B",
        help="alternate runs with the setting at each value (with --runs): the medians "
        "side by side and the median run's stages of each, as BENCHMARKS.md shows them",
    )
    p.add_argument("--runs", type=int, default=1, help="runs of each value (--compare)")
    p.add_argument(
        "--load-rate",
        type=float,
        default=0.0,
        help="open-loop requests per second (the Python client, latency from the intended"
        " send time, as the bench's row 3b) instead of wrk's closed loop",
    )
    args = p.parse_args(argv)
    overrides = dict(_setting(item) for item in args.set)
    if args.compare:
        print(
            compare(
                args.scenario,
                args.compare,
                args.runs,
                args.seconds,
                args.rate,
                overrides,
                args.load_rate,
            )
        )
        return 0
    result = run(
        args.scenario, min(args.seconds, 60.0), args.rate, args.out, overrides, args.load_rate
    )
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=2))
        return 0
    cpu = result["cpu_us_per_request"]
    print(
        f"{result['scenario']}: {result['rps']} req/s, p99 {result['p99_ms']} ms, "
        f"errors {result['errors']} {result['statuses']}; CPU µs per request: "
        + ", ".join(f"{k} {v}" for k, v in cpu.items())  # type: ignore[attr-defined]
    )
    print(f"gateway system calls per request: {result['gateway_syscalls_per_request']}")
    print(f"{result['samples']} samples of the gateway workers\n")
    print(result["table"])
    libraries = result["by_library"]
    if libraries:
        gateway_us = cpu["gateway"]  # type: ignore[index]
        print("\nThe same CPU by library (perf record, cycles only):\n")
        print("| library | share | µs per request |\n|---|---:|---:|")
        for name, share in sorted(libraries.items(), key=lambda kv: -kv[1]):  # type: ignore[attr-defined]
            print(f"| {name} | {share:.1f}% | {share / 100 * gateway_us:.1f} |")
        print("\nStages, the I/O samples priced by perf (the figure to compare):\n")
        print(result["python_table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
