"""There is no Docker engine here, so the compose file is checked by reading it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from flashsale.settings import Settings
from tests.dockerkit import docker_context

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
BROKERS = ("kafka-1", "kafka-2", "kafka-3")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _parsable(env: dict[str, Any]) -> dict[str, Any]:
    """The settings without the secrets' files (mounted by compose, absent here)."""
    return {k: v for k, v in env.items() if not str(v).startswith("/run/secrets/")}


def test_services_and_images(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "postgres", "gateway", "consumers", "migrate", "lb"} <= set(services)
    for name in BROKERS:
        assert services[name]["image"].startswith("apache/kafka"), name
    assert services["redis"]["image"].startswith("redis:")
    assert services["postgres"]["image"].startswith("postgres:")


def test_kafka_is_three_kraft_brokers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert not [n for n in services if n.startswith("kafka") and n not in BROKERS]
    envs = [services[name]["environment"] for name in BROKERS]
    voters = {
        f"{env['KAFKA_NODE_ID']}@{name}:9093" for name, env in zip(BROKERS, envs, strict=True)
    }
    assert len(voters) == 3
    for name, env in zip(BROKERS, envs, strict=True):
        assert "controller" in env["KAFKA_PROCESS_ROLES"] and "broker" in env["KAFKA_PROCESS_ROLES"]
        assert set(env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")) == voters
        assert env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{name}:9092"
        assert env["CLUSTER_ID"] == envs[0]["CLUSTER_ID"]
        # the internal topics survive a broker too, and nothing is elected unclean
        assert int(env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) == 3
        assert int(env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"]) == 3
        assert int(env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"]) == 2
        assert int(env["KAFKA_MIN_INSYNC_REPLICAS"]) == 2
        assert env["KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE"] == "false"
        assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
        assert services[name]["volumes"][0].startswith(f"{name}-data:")
    assert "zookeeper" not in str(compose).lower()


def test_topics_are_replicated_and_the_producer_idempotent(compose: dict[str, Any]) -> None:
    env = compose["services"]["gateway"]["environment"]
    settings = Settings.from_env(_parsable({k: v for k, v in env.items() if "${" not in str(v)}))
    assert settings.kafka_bootstrap == ",".join(f"{b}:9092" for b in BROKERS)
    assert settings.kafka_replication_factor == 3
    assert settings.kafka_min_insync_replicas == 2
    assert settings.kafka_enable_idempotence
    assert settings.kafka_assignor == "sticky"  # aiokafka has no cooperative-sticky
    # the consumers the compose file runs can each own a partition of one hot sale
    consumers = compose["services"]["consumers"]["deploy"]["replicas"]
    assert 1 < _default(consumers) <= settings.kafka_partitions


def _default(value: Any) -> int:
    """``${NAME:-3}`` → 3 (compose's default); a number stays itself."""
    text = str(value)
    return int(text.split(":-", 1)[1].rstrip("}") if ":-" in text else text)


def test_gateways_scale_behind_the_load_balancer(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gateway, lb = services["gateway"], services["lb"]
    assert _default(gateway["deploy"]["replicas"]) >= 2
    assert "ports" not in gateway and "container_name" not in gateway  # replicas can scale
    assert lb["ports"] == ["8080:8080"]
    assert lb["depends_on"]["gateway"]["condition"] == "service_healthy"
    config_mount = next(v for v in lb["volumes"] if "haproxy.cfg" in v)
    config = (ROOT / config_mount.split(":")[0]).read_text()
    assert "server-template" in config and "gateway:8080" in config
    assert "resolvers docker" in config and "option httpchk GET /readyz" in config
    assert "option forwardfor" in config
    # the gateways believe X-Forwarded-For from the lb's address, and only from it
    lb_ip = lb["networks"]["default"]["ipv4_address"]
    env = gateway["environment"]
    assert env["FLASHSALE_TRUSTED_PROXIES"] == f"{lb_ip}/32"
    # no replica shares its data folder with another (metrics files, heartbeat)
    for name in ("gateway", "consumers"):
        assert "volumes" not in services[name], name


def _published(port: str) -> tuple[str, str]:
    """A short-syntax port as (host address, host port), compose's defaults filled in:
    ``"${MONITORING_BIND:-127.0.0.1}:9090:9090"`` → ("127.0.0.1", "9090")."""
    text = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", port)
    parts = text.split(":")
    return (parts[0], parts[1]) if len(parts) == 3 else ("0.0.0.0", parts[0])


def test_only_the_load_balancer_is_published_to_the_network(compose: dict[str, Any]) -> None:
    """Prometheus has no login: on every interface, it would hand anyone every metric the
    metrics token guards. Monitoring listens on loopback unless MONITORING_BIND opens it."""
    published = {
        name: [_published(str(p)) for p in service.get("ports", ())]
        for name, service in compose["services"].items()
    }
    assert published.pop("lb") == [("0.0.0.0", "8080")]
    assert published.pop("prometheus") == [("127.0.0.1", "9090")]
    assert published.pop("grafana") == [("127.0.0.1", "3000")]
    assert not any(published.values()), published


def test_redis_has_aof(compose: dict[str, Any]) -> None:
    command = " ".join(compose["services"]["redis"]["command"])
    assert "--appendonly yes --appendfsync always" in command


def test_health_checks(compose: dict[str, Any]) -> None:
    for name in (
        *BROKERS,
        "redis",
        "postgres",
        "gateway",
        "consumers",
        "lb",
        "prometheus",
        "grafana",
    ):
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
        "FLASHSALE_SECRET_KEY_FILE",
        "FLASHSALE_WORKERS",
        "FLASHSALE_HTTP_PORT",
    ):
        assert key in env, key
    assert int(env["FLASHSALE_WORKERS"]) > 1
    assert env["FLASHSALE_KAFKA_ENABLE_IDEMPOTENCE"] == "true"
    concrete = {k: v for k, v in env.items() if "${" not in str(v)}
    Settings.from_env(_parsable(concrete))  # every value parses


def test_commands(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["gateway"]["command"] == ["flashsale", "serve"]
    assert services["consumers"]["command"] == ["flashsale", "consume"]
    assert services["migrate"]["command"] == ["flashsale", "migrate"]
    deps = services["gateway"]["depends_on"]
    assert deps["migrate"]["condition"] == "service_completed_successfully"
    for broker in BROKERS:
        assert deps[broker]["condition"] == "service_healthy"


def test_no_hard_coded_credentials(compose: dict[str, Any]) -> None:
    services = compose["services"]
    env = services["gateway"]["environment"]
    assert "${POSTGRES_PASSWORD:?" in env["FLASHSALE_DATABASE_URL"]
    assert "${REDIS_PASSWORD:?" in env["FLASHSALE_REDIS_URL"]
    required = " ".join(compose["x-required-credentials"])
    for name in SECRET_SOURCES.values():  # compose refuses to start without each
        assert "${" + name + ":?" in required, name
    assert "flashsale:flashsale@" not in str(compose)


# compose secret -> the variable of compose's environment (or .env) it is made from
SECRET_SOURCES = {
    "flashsale_secret_key": "FLASHSALE_SECRET_KEY",
    "metrics_token": "FLASHSALE_METRICS_TOKEN",
    "redis_password": "REDIS_PASSWORD",
    "postgres_password": "POSTGRES_PASSWORD",
    "grafana_admin_password": "GRAFANA_ADMIN_PASSWORD",
}


def _secrets_by_file(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        command = " ".join(service.get("command") or [])
        health = " ".join((service.get("healthcheck") or {}).get("test") or [])
        for variable in SECRET_SOURCES.values():
            assert variable not in command and variable not in health, (name, variable)
        mounted = set(service.get("secrets") or [])
        read = set(re.findall(r"/run/secrets/(\w+)", str(service)))
        assert read <= mounted, (name, read - mounted)  # every file read is mounted
        for key, value in (service.get("environment") or {}).items():
            if key.endswith("_FILE") or key.endswith("__FILE"):
                assert str(value).startswith("/run/secrets/"), (name, key)


def test_secrets_come_by_file_never_on_a_command_line(compose: dict[str, Any]) -> None:
    assert {k: v["environment"] for k, v in compose["secrets"].items()} == SECRET_SOURCES
    _secrets_by_file(compose)
    services = compose["services"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"] == (
        "/run/secrets/postgres_password"
    )
    assert "POSTGRES_PASSWORD" not in services["postgres"]["environment"]
    grafana = services["grafana"]["environment"]
    assert "GF_SECURITY_ADMIN_PASSWORD" not in grafana
    assert grafana["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"
    env = services["gateway"]["environment"]
    assert "FLASHSALE_SECRET_KEY" not in env and "FLASHSALE_METRICS_TOKEN" not in env


def _overlay(base: Any, over: Any) -> Any:
    """Compose's merge of an override file: maps merge key by key, anything else replaces."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = _overlay(base.get(key), value) if key in base else value
        return out
    return over


def test_redis_cluster_overlay(compose: dict[str, Any]) -> None:
    """`-f deploy/compose.redis-cluster.yml`: six nodes in cluster mode with the same
    durability, created by one job, and every flashsale service on the cluster with one
    replica confirmed per batch."""
    over = yaml.safe_load((ROOT / "deploy" / "compose.redis-cluster.yml").read_text())
    services = _overlay(compose, over)["services"]
    nodes = ["redis", *(f"redis-{n}" for n in range(2, 7))]
    for name in nodes:
        command = " ".join(services[name]["command"])
        assert "--cluster-enabled yes" in command, name
        assert "--appendfsync always" in command, name
        assert "masterauth" in command and "test" in services[name]["healthcheck"], name
        assert "redis_password" in services[name]["secrets"], name
    _secrets_by_file({**compose, "services": services})
    create = " ".join(services["redis-cluster-init"]["command"])
    assert "--cluster-replicas 1" in create
    assert all(f"{n}:6379" in create for n in nodes)
    assert set(services["redis-cluster-init"]["depends_on"]) == set(nodes)
    for name in ("migrate", "gateway", "consumers"):
        env = Settings.from_env(_parsable(services[name]["environment"]))
        assert env.redis_cluster and env.redis_wait_replicas == 1, name
        seeds = {s.split("@")[-1].split("//")[-1].split("/")[0] for s in env.redis_seeds}
        assert seeds <= {f"{n}:6379" for n in nodes} and len(seeds) >= 3, seeds
        needs = services[name]["depends_on"]["redis-cluster-init"]
        assert needs["condition"] == "service_completed_successfully", name


def test_the_build_context_is_what_the_image_needs() -> None:
    """Not the 419 MB virtualenv, the data folder, the tests or the load tests."""
    sent = docker_context()
    tops = {path.split("/", 1)[0] for path in sent}
    assert tops == {
        "pyproject.toml",
        "constraints.txt",
        "README.md",
        "flashsale",
        "gateway",
        "stack",
        "consumers",
        "lua",
    }, tops
    assert not [p for p in sent if "__pycache__" in p]
    assert sum((ROOT / p).stat().st_size for p in sent) < 5_000_000
    dockerfile = (ROOT / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.M):
        for name in source.split():
            assert name.rstrip("/") in tops, name  # every COPY finds its files


def test_the_image_is_built_in_two_stages_with_a_health_check() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", dockerfile, flags=re.M)[1:]
    assert len(stages) == 2 and stages[0].split()[2] == "build"
    final = stages[1]
    assert re.findall(r"^COPY (.+)$", final, re.M) == ["--from=build /opt/flashsale /opt/flashsale"]
    assert "HEALTHCHECK" in final and "/healthz" in final
    assert re.search(r"^USER flashsale$", final, re.M)
    assert "loadtests" not in dockerfile.replace("no load tests", "")
