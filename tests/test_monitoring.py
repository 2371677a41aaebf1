"""Prometheus and Grafana as docker-compose provisions them (read, not run: no Docker here)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from flashsale.settings import Settings
from flashsale.stores.metrics import Metrics

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


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
    assert used <= exported, used - exported
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


# Series per sale (or per partition) exist once there is a sale (or a partition) to plot.
PER_SALE = {
    "flashsale_sale_remaining_units",
    "flashsale_sale_allotment_units",
    "flashsale_reconcile_drift_units",
    "flashsale_queue_length",
    "flashsale_consumer_lag",
}
# Set only by `flashsale reconcile` when it runs: no data until then is the truth, where a 0
# exported by the gateway or the consumers would claim checks nobody made.
MEASURED_BY_RECONCILE = {"flashsale_reconcile_money_drift"}


def _wanted(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(metric, {label: regex}) for each selector of a panel's expression."""
    out = []
    for name, matchers in re.findall(r"(flashsale_[a-z_]+)(?:\{([^}]*)\})?", expr):
        labels = dict(re.findall(r'(\w+)=~?"([^"]*)"', matchers or ""))
        out.append((name, {k: v for k, v in labels.items() if not v.startswith("$")}))
    return out


def test_what_the_dashboard_plots_exists_at_zero_before_any_event() -> None:
    """Not "no data" until the first refusal, join or sweep: every series a panel selects
    is exported at 0 by a gateway and consumers that have served nothing."""
    from consumers.runner import declare_metrics
    from gateway.app import create_app

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    create_app(
        Settings().with_(
            redis_url="redis://127.0.0.1:1/0",
            database_url="postgresql://x@127.0.0.1:1/x",
            kafka_bootstrap="127.0.0.1:1",
            secret_key="k" * 40,
        ),
        metrics=metrics,
    )  # builds, connects to nothing
    declare_metrics(metrics)
    samples = [
        sample
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    ]
    board = json.loads((ROOT / "deploy/grafana/dashboards/flashsale.json").read_text())
    for panel in board["panels"]:
        for target in panel["targets"]:
            for name, labels in _wanted(target["expr"]):
                if name in PER_SALE or name in MEASURED_BY_RECONCILE:
                    continue
                alternatives = (
                    [{**labels, "code": code} for code in labels.get("code", "").split("|")]
                    if "code" in labels
                    else [labels]
                )
                for want in alternatives:
                    found = [
                        s
                        for s in samples
                        if s.name == name
                        and all(re.fullmatch(v, s.labels.get(k, "")) for k, v in want.items())
                    ]
                    assert found, f"{panel['title']}: no series {name} {want}"
                    assert all(s.value == 0 for s in found if not s.name.endswith("_created"))
