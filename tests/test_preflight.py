"""`up` and `serve` stop at once, in one line, when their port is taken (by another stack
sharing it through SO_REUSEPORT, or by anything else) or a given server does not answer a
real command (Redis PING with its password, PostgreSQL SELECT 1, a Kafka metadata request)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from flashsale.settings import Settings
from stack.embedded import EmbeddedStack, free_port
from stack.preflight import PreflightFailed, check_reachable, claim_port
from stack.processes import CrashLoop, Supervised
from stack.up import _wait_ready

pytestmark = [pytest.mark.integration]


def _run(command: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
    clean.update({"FLASHSALE_DATA_DIR": str(tmp_path / "data"), **env})
    return subprocess.run(
        [sys.executable, "-m", "stack", command],
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _errors(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_a_claimed_port_refuses_a_second_stack() -> None:
    port = free_port()
    held = claim_port("127.0.0.1", port)
    try:
        # a worker of this stack still joins it
        worker = socket.socket()
        worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        worker.bind(("127.0.0.1", port))
        worker.listen()
        with pytest.raises(PreflightFailed, match=re.escape(f"127.0.0.1:{port} is already in use")):
            claim_port("127.0.0.1", port)
        worker.close()
    finally:
        held.close()
    claim_port("127.0.0.1", port).close()  # free again


def test_serve_on_a_port_in_use_fails_in_one_line(tmp_path: Path) -> None:
    port = free_port()
    # what a first stack's worker looks like: listening with SO_REUSEPORT
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    other.bind(("127.0.0.1", port))
    other.listen()
    try:
        started = time.monotonic()
        result = _run(
            "serve",
            tmp_path,
            FLASHSALE_HTTP_PORT=str(port),
            FLASHSALE_REDIS_URL="redis://127.0.0.1:1/0",
            FLASHSALE_DATABASE_URL="postgresql://x@127.0.0.1:1/x",
            FLASHSALE_KAFKA_BOOTSTRAP="127.0.0.1:1",
            FLASHSALE_SECRET_KEY="k" * 40,
        )
        assert result.returncode == 2
        assert _errors(result) == [
            f"flashsale: 127.0.0.1:{port} is already in use (Address already in use): another "
            "flashsale or another program listens there; stop it or set FLASHSALE_HTTP_PORT"
        ]
        assert time.monotonic() - started < 30  # no waiting for anything
    finally:
        other.close()


def test_up_with_an_unreachable_redis_fails_before_starting_anything(tmp_path: Path) -> None:
    result = _run(
        "up",
        tmp_path,
        FLASHSALE_HTTP_PORT=str(free_port()),
        FLASHSALE_REDIS_URL="redis://:secret@127.0.0.1:1/0",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = _errors(result)
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        "flashsale: FLASHSALE_REDIS_URL=redis://127.0.0.1:1/0 does not answer"
    )
    assert "secret" not in result.stderr
    assert not (tmp_path / "data" / "postgres").exists()  # nothing was started


def _servers(stack: EmbeddedStack | None) -> dict[str, str]:
    """The real servers the suite runs on."""
    names = {"redis_url": "redis", "database_url": "postgres", "kafka_bootstrap": "kafka"}
    out = {}
    for name, server in names.items():
        url = os.environ[f"FLASHSALE_{name.upper()}"] if stack is None else stack.url(server)
        assert url is not None
        out[name] = url
    return out


@pytest.fixture
def silent() -> Iterator[str]:
    """host:port of a socket that accepts connections (the kernel does) and never answers."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        yield f"127.0.0.1:{listening.getsockname()[1]}"


def _wrong_password(url: str) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username or ''}:wrong-password@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def test_real_servers_answer_the_preflight(stack: EmbeddedStack | None) -> None:
    check_reachable(Settings().with_(**_servers(stack)))


@pytest.mark.parametrize(
    ("name", "spoil", "why"),
    [
        ("redis_url", lambda url, silent: _wrong_password(url), "invalid username-password pair"),
        ("redis_url", lambda url, silent: f"redis://{silent}/0", "no answer within 3s"),
        ("database_url", lambda url, silent: _wrong_password(url), "password authentication"),
        ("database_url", lambda url, silent: f"postgresql://u:p@{silent}/x", "no answer within 3s"),
        ("kafka_bootstrap", lambda url, silent: silent, "no answer within 3s"),
        ("kafka_bootstrap", lambda url, silent: "127.0.0.1:1", "Connect call failed"),
    ],
    ids=[
        "redis-wrong-password",
        "redis-silent",
        "postgres-wrong-password",
        "postgres-silent",
        "kafka-silent",
        "kafka-refused",
    ],
)
def test_a_server_that_does_not_answer_its_command_is_one_line(
    stack: EmbeddedStack | None,
    silent: str,
    name: str,
    spoil: Callable[[str, str], str],
    why: str,
) -> None:
    servers = _servers(stack)
    servers[name] = spoil(servers[name], silent)
    with pytest.raises(PreflightFailed) as failed:
        check_reachable(Settings().with_(**servers))
    message = str(failed.value)
    assert "\n" not in message, message
    assert message.startswith(f"FLASHSALE_{name.upper()}="), message
    assert why in message, message
    assert "wrong-password" not in message and "@" not in message  # no password is printed


@pytest.mark.parametrize("case", ["wrong-password", "silent"])
def test_up_with_a_redis_that_does_not_answer_starts_nothing(
    tmp_path: Path, stack: EmbeddedStack | None, silent: str, case: str
) -> None:
    """A wrong Redis password, a Redis port that accepts and never answers: one line and exit
    2 before PostgreSQL or the broker is started, not a stack half up and a traceback."""
    url = _servers(stack)["redis_url"]
    result = _run(
        "up",
        tmp_path,
        FLASHSALE_HTTP_PORT=str(free_port()),
        FLASHSALE_REDIS_URL=_wrong_password(url)
        if case == "wrong-password"
        else f"redis://{silent}/0",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = _errors(result)
    assert len(lines) == 1, lines
    assert lines[0].startswith("flashsale: FLASHSALE_REDIS_URL="), lines
    assert not (tmp_path / "data" / "postgres").exists()  # nothing was started
    assert not (tmp_path / "data" / "kafka").exists()


def test_a_worker_that_dies_while_starting_is_reported_at_once() -> None:
    """`up` does not sit out its 60 s ready wait when a child dies first: it names it."""
    nothing_listens = f"http://127.0.0.1:{free_port()}/readyz"
    dying = Supervised(
        "gateway worker 1",
        lambda: subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"]),
    )
    # without the early report this would return False after 60 s, and fail the test
    with pytest.raises(CrashLoop, match="gateway worker 1 exited with 3 while starting"):
        _wait_ready(nothing_listens, 60, [dying], [dying])
