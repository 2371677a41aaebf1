"""Prometheus and Grafana as docker-compose provisions them (read, not run: no Docker here)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from flashsale.stores.metrics import Metrics

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
WAITING_ROOM = {"flashsale_queue_length", "flashsale_queue_admitted_total"}  # its branch


def _yaml(path: str) -> Any:
    return yaml.safe_load((ROOT / path).read_text())


def test_compose_mounts_what_is_in_the_repo() -> None:
    services = _yaml("docker-compose.yml")["services"]
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
    assert "metrics_token" in services["prometheus"]["secrets"]


def test_prometheus_scrapes_the_gateway_and_the_consumers() -> None:
    compose = _yaml("docker-compose.yml")
    env = compose["x-flashsale-env"]
    config = _yaml("deploy/prometheus/prometheus.yml")
    targets = {  # every replica of each service, found through Docker's DNS
        job["job_name"]: [
            f"{name}:{sd['port']}" for sd in job["dns_sd_configs"] for name in sd["names"]
        ]
        for job in config["scrape_configs"]
    }
    assert targets["flashsale-gateway"] == [f"gateway:{env['FLASHSALE_HTTP_PORT']}"]
    assert targets["flashsale-consumers"] == [f"consumers:{env['FLASHSALE_METRICS_PORT']}"]
    for job in config["scrape_configs"]:
        assert job["authorization"]["credentials_file"] == "/run/secrets/metrics_token"


def test_grafana_panels_use_metrics_that_exist() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    exported: set[str] = set()
    for family in registry.collect():
        exported |= {family.name, family.name + "_total", family.name + "_bucket"}
    board = json.loads((ROOT / "deploy/grafana/dashboards/flashsale.json").read_text())
    used = {
        name
        for panel in board["panels"]
        for target in panel["targets"]
        for name in re.findall(r"flashsale_[a-z_]+", target["expr"])
    }
    assert used - exported <= WAITING_ROOM
    titles = " ".join(p["title"].lower() for p in board["panels"])
    for figure in (
        "remaining",
        "accepted",
        "refusals",
        "latency",
        "lag",
        "dead letters",
        "expiry",
        "drift",
        "waiting room",
    ):
        assert figure in titles, figure
    provider = _yaml("deploy/grafana/provisioning/dashboards/flashsale.yml")
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
