"""There is no Docker engine here, so the compose file is checked by reading it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from flashsale.settings import Settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_services_and_images(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"kafka", "redis", "postgres", "gateway", "consumers", "migrate"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka")
    assert services["redis"]["image"].startswith("redis:")
    assert services["postgres"]["image"].startswith("postgres:")


def test_kafka_is_kraft(compose: dict[str, Any]) -> None:
    env = compose["services"]["kafka"]["environment"]
    assert "controller" in env["KAFKA_PROCESS_ROLES"]
    assert "zookeeper" not in str(compose).lower()


def test_redis_has_aof(compose: dict[str, Any]) -> None:
    command = compose["services"]["redis"]["command"]
    assert "--appendonly" in command and command[command.index("--appendonly") + 1] == "yes"


def test_health_checks(compose: dict[str, Any]) -> None:
    for name in ("kafka", "redis", "postgres", "gateway", "consumers"):
        assert "test" in compose["services"][name]["healthcheck"], name
    assert "/readyz" in str(compose["services"]["gateway"]["healthcheck"]["test"])


def test_same_settings_everywhere(compose: dict[str, Any]) -> None:
    services = compose["services"]
    env = services["gateway"]["environment"]
    assert env == services["consumers"]["environment"] == services["migrate"]["environment"]
    for key in (
        "FLASHSALE_REDIS_URL",
        "FLASHSALE_DATABASE_URL",
        "FLASHSALE_KAFKA_BOOTSTRAP",
        "FLASHSALE_SECRET_KEY",
        "FLASHSALE_WORKERS",
        "FLASHSALE_HTTP_PORT",
    ):
        assert key in env, key
    assert int(env["FLASHSALE_WORKERS"]) > 1
    assert env["FLASHSALE_KAFKA_ENABLE_IDEMPOTENCE"] == "true"
    concrete = {k: v for k, v in env.items() if "${" not in str(v)}
    Settings.from_env(concrete)  # every value parses


def test_commands(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["gateway"]["command"] == ["flashsale", "serve"]
    assert services["consumers"]["command"] == ["flashsale", "consume"]
    assert services["migrate"]["command"] == ["flashsale", "migrate"]
    deps = services["gateway"]["depends_on"]
    assert deps["migrate"]["condition"] == "service_completed_successfully"
    assert deps["kafka"]["condition"] == "service_healthy"


def test_no_hard_coded_credentials(compose: dict[str, Any]) -> None:
    services = compose["services"]
    pg_env = services["postgres"]["environment"]
    assert pg_env["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    env = services["gateway"]["environment"]
    assert "${POSTGRES_PASSWORD:?" in env["FLASHSALE_DATABASE_URL"]
    assert "${REDIS_PASSWORD:?" in env["FLASHSALE_REDIS_URL"]
    command = services["redis"]["command"]
    assert "--requirepass" in command
    assert command[command.index("--requirepass") + 1].startswith("${REDIS_PASSWORD:?")
    assert "REDIS_PASSWORD" in str(services["redis"]["healthcheck"]["test"])
    assert "flashsale:flashsale@" not in str(compose)
