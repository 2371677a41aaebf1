"""The production image, without a Docker engine: the project installed the way the
Dockerfile installs it (not editable, into a fresh virtualenv), and each compose service's
command run as an unprivileged user with compose's environment — only the server
addresses, passwords and ports swapped for the suite's own. Compose's health checks must
pass as that user, and nothing may need root or a folder the user does not own."""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from flashsale.settings import Settings
from stack.embedded import free_port, reachable_by
from tests.dockerkit import docker_context

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = Path("/usr/bin/python3")
APP_USER = "flashsale-app"


def _user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(APP_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", APP_USER],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(APP_USER)


@pytest.fixture(scope="module")
def image() -> Iterator[Path]:
    """A virtualenv anyone can read, with the project installed as the Dockerfile does."""
    if os.geteuid() != 0 or not SYSTEM_PYTHON.exists():
        pytest.skip("needs root (to switch users) and Debian's python3")
    root = Path(tempfile.mkdtemp(prefix="flashsale-image-"))
    root.chmod(0o755)
    venv = root / "venv"
    context = root / "context"  # what `docker build` sends: no load tests, no tests
    for name in docker_context():
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, context / name)
    try:
        subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [
                str(venv / "bin" / "pip"),
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-c",
                str(context / "constraints.txt"),
                str(context),
            ],
            check=True,
            timeout=600,
        )
        yield venv
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _env(base: Settings, data_dir: Path, dbname: str, secrets_dir: Path) -> dict[str, str]:
    """Compose's x-flashsale-env, with the suite's servers instead of the containers and
    compose's secrets as files in ``secrets_dir``."""
    compose = _compose()
    env = {k: str(v) for k, v in compose["services"]["gateway"]["environment"].items()}
    assert env == {k: str(v) for k, v in compose["services"]["consumers"]["environment"].items()}
    assert base.database_url and base.redis_url and base.kafka_bootstrap
    db_url = re.sub(r"/[^/]*$", f"/{dbname}", base.database_url)
    swapped = {
        "FLASHSALE_REDIS_URL": base.redis_url,
        "FLASHSALE_DATABASE_URL": db_url,
        "FLASHSALE_KAFKA_BOOTSTRAP": base.kafka_bootstrap,
        "FLASHSALE_HTTP_HOST": "127.0.0.1",
        "FLASHSALE_HTTP_PORT": str(free_port()),
        "FLASHSALE_METRICS_PORT": str(free_port()),
        "FLASHSALE_DATA_DIR": str(data_dir),
        "FLASHSALE_KAFKA_ORDERS_TOPIC": f"image.orders.{dbname}",
        "FLASHSALE_KAFKA_DLQ_TOPIC": f"image.orders.dlq.{dbname}",
        "FLASHSALE_KAFKA_CONSUMER_GROUP": f"image-{dbname}",
        "FLASHSALE_KAFKA_ENABLE_IDEMPOTENCE": "false",  # tansu has no InitProducerId
    }
    env.update(swapped)
    for key, value in list(env.items()):
        if value.startswith("/run/secrets/"):  # a compose secret: a file the user can read
            path = secrets_dir / Path(value).name
            path.write_text(secrets.token_hex(24) + "\n")
            path.chmod(0o644)
            env[key] = str(path)
    env["PATH"] = "/usr/bin:/bin"
    return env


def _as(user: pwd.struct_passwd) -> Callable[[], None]:
    def drop() -> None:
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    return drop


def _command(venv: Path, cmd: list[str]) -> list[str]:
    """A compose command (``flashsale …``, ``python …``) resolved in the image's venv."""
    return [str(venv / "bin" / cmd[0]), *cmd[1:]]


async def _sql(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def test_compose_services_run_as_an_unprivileged_user(image: Path, base_settings: Settings) -> None:
    user = _user()
    assert reachable_by(user, image / "bin" / "flashsale")
    home = Path(tempfile.mkdtemp(prefix="flashsale-volume-"))
    home.chmod(0o755)
    data_dir = home / "var-lib-flashsale"  # what the image makes: owned by its user
    data_dir.mkdir()
    os.chown(data_dir, user.pw_uid, user.pw_gid)
    dbname = "flashsale_image_" + secrets.token_hex(4)
    assert base_settings.database_url
    asyncio.run(_sql(base_settings.database_url, f'CREATE DATABASE "{dbname}"'))
    env = _env(base_settings, data_dir, dbname, home)
    services = _compose()["services"]
    running: list[subprocess.Popen[bytes]] = []

    def start(service: str) -> subprocess.Popen[bytes]:
        with (home / f"{service}.log").open("wb") as log:
            proc = subprocess.Popen(
                _command(image, services[service]["command"]),
                env=env,
                cwd=str(data_dir),
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_as(user),
            )
        running.append(proc)
        return proc

    def healthy(service: str) -> bool:
        test = services[service]["healthcheck"]["test"]
        assert test[0] == "CMD"
        argv = [a.replace("/var/lib/flashsale", str(data_dir)) for a in test[1:]]
        argv = [a.replace(":8080/", f":{env['FLASHSALE_HTTP_PORT']}/") for a in argv]
        done = subprocess.run(
            _command(image, argv), env=env, preexec_fn=_as(user), capture_output=True, check=False
        )
        return done.returncode == 0

    def wait(service: str, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 60
        while not healthy(service):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"{service} is not healthy:\n"
                    + (home / f"{service}.log").read_text(errors="replace")[-3000:]
                )
            time.sleep(0.5)

    try:
        migrate = start("migrate")
        assert migrate.wait(120) == 0, (home / "migrate.log").read_text()[-3000:]
        gateway = start("gateway")
        wait("gateway", gateway)
        token = Path(env["FLASHSALE_METRICS_TOKEN_FILE"]).read_text().strip()
        request = urllib.request.Request(
            f"http://127.0.0.1:{env['FLASHSALE_HTTP_PORT']}/metrics",
            headers={"Authorization": f"Bearer {token}"},
        )
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert resp.status == 200
        consumers = start("consumers")
        wait("consumers", consumers)
        with pytest.raises(subprocess.CalledProcessError):  # the image has no load tests
            subprocess.run(
                [str(image / "bin" / "python"), "-c", "import loadtests"],
                cwd=str(home),  # not the checkout, whose folder `python -c` would import
                check=True,
                capture_output=True,
            )
        owners = {p.stat().st_uid for p in data_dir.rglob("*")}
        assert owners <= {user.pw_uid}, "something in the data folder is not the user's"
    finally:
        for proc in running:
            if proc.poll() is None:
                proc.terminate()
        for proc in running:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        asyncio.run(
            _sql(base_settings.database_url, f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        )
        shutil.rmtree(home, ignore_errors=True)


def test_dockerfile_gives_its_user_a_data_folder() -> None:
    text = (ROOT / "Dockerfile").read_text()
    user = re.search(r"^USER (\S+)", text, re.M)
    assert user and user.group(1) not in ("root", "0", "nobody")
    assert re.search(rf"chown {user.group(1)}\S* /var/lib/flashsale", text)
    assert 'VOLUME ["/var/lib/flashsale"]' in text
    compose = _compose()
    for service in ("gateway", "consumers"):
        # replicated: each replica keeps the image's VOLUME as an anonymous volume of its
        # own (initialised from the image, so owned by its user); a named volume there
        # would be one folder shared by every replica
        mounts = compose["services"][service].get("volumes", [])
        assert not any(str(m).endswith(":/var/lib/flashsale") for m in mounts), service
        assert "replicas" in compose["services"][service]["deploy"], service
