"""``flashsale capacity`` reproduces a plan worked out by hand from a bench result.

The bench JSON below has the shape ``flashsale bench`` writes (``rows[].scenario``,
``detail.cpu_us`` per process per request, the drain row's CPU seconds and events).

By hand, for 100,000 joins/s and 20,000 storefront requests/s at 70 %:

- gateway: 100,000 × 400 µs + 20,000 × 500 µs = 50 cores; ⌈50 / 0.7⌉ = 72; + ⌈14.4⌉ = 87
- Redis: 100,000 × 90 µs = 9 threads; ⌈12.86⌉ = 13 shards; + ⌈2.6⌉ = 16
- broker: 100,000 × 60 µs = 6 cores; ⌈8.57⌉ = 9; + ⌈1.8⌉ = 11
- consumers: 0.6 s / 20,000 orders = 30 µs; 100,000 × 30 µs = 3; ⌈4.29⌉ = 5; + 1 = 6
- PostgreSQL: 1.6 s / 20,000 = 80 µs; 100,000 × 80 + 20,000 × 200 µs = 12; ⌈17.1⌉ = 18; + 4 = 22
- one hot sale: 13 buckets (a shard each); in flight: 100,000 × 4 ms = 400
- first bottleneck: the gateway, 50 / 72 = 69 % of each core (Redis 9 / 13 = 69.2 % is next)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from stack import capacity

pytestmark = pytest.mark.unit


def bench(cpu_key: str = "cpu_us", nested: bool = False) -> dict[str, Any]:
    def per(value: float) -> Any:
        return {"us_per_request": value} if nested else value

    return {
        "mode": "quick",
        "rows": [
            {"scenario": "1 HTTP ceiling", "rps": 9000.0, "detail": {cpu_key: {"ceiling": 90}}},
            {
                "scenario": "3 accept path (join, 202)",
                "rps": 2000.0,
                "p50_ms": 4.0,
                "p99_ms": 12.0,
                "errors": 0,
                "note": "",
                "detail": {
                    cpu_key: {"gateway": per(400.0), "redis": per(90.0), "kafka": per(60.0)}
                },
            },
            {
                "scenario": "6b one hot sale, 1 consumer(s) (orders/s)",
                "rps": 6000.0,
                "detail": {"events": 20_000, "consumer_cpu_s": 0.6, "postgres_cpu_s": 1.6},
            },
        ],
    }


def test_the_plan_is_the_hand_computation(tmp_path: Path) -> None:
    source = tmp_path / "bench.json"
    source.write_bytes(orjson.dumps(bench()))
    costs = capacity.read_costs(bench(), storefront_gateway_us=500.0, storefront_postgres_us=200.0)
    p = capacity.plan(costs, peak_joins=100_000, storefront_rps=20_000, target=0.7)
    got = {t.name: (round(t.cores, 6), t.units, t.with_redundancy) for t in p.tiers}
    assert got == {
        "gateway": (50.0, 72, 87),
        "Redis": (9.0, 13, 16),
        "broker": (6.0, 9, 11),
        "consumers": (3.0, 5, 6),
        "PostgreSQL": (12.0, 18, 22),
    }
    assert p.hot_sale_buckets == 13
    assert p.in_flight_joins == pytest.approx(400.0)
    assert p.bottleneck.startswith("gateway (69%")
    assert not p.notes
    # the same numbers whichever shape the per-process figures take
    again = capacity.read_costs(
        bench("cpu_us_per_request", nested=True),
        storefront_gateway_us=500.0,
        storefront_postgres_us=200.0,
    )
    assert (again.gateway_per_join, again.redis_per_join, again.postgres_per_order) == (
        400.0,
        90.0,
        80.0,
    )
    assert "detail.cpu_us_per_request.gateway" in again.sources["gateway µs per join"]


def test_the_command_prints_and_writes_capacity_md(tmp_path: Path) -> None:
    source = tmp_path / "bench.json"
    source.write_bytes(orjson.dumps(bench()))
    target = tmp_path / "CAPACITY.md"
    target.write_text("# Capacity\n\nWritten by people.\n", encoding="utf-8")
    args = [
        sys.executable,
        "-m",
        "stack",
        "capacity",
        "--peak-joins",
        "100000",
        "--storefront-rps",
        "20000",
        "--from",
        str(source),
        "--storefront-gateway-us",
        "500",
        "--storefront-postgres-us",
        "200",
        "--write",
        str(target),
    ]
    for _ in range(2):  # the second run replaces the section it wrote
        proc = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
    assert "| gateway | core | 50.00 | 72 | 87 | 69% |" in proc.stdout
    assert "| PostgreSQL | core | 12.00 | 18 | 22 | 67% |" in proc.stdout
    assert "first bottleneck: gateway" in proc.stdout
    written = target.read_text(encoding="utf-8")
    assert written.startswith("# Capacity\n\nWritten by people.\n")
    assert written.count(capacity.BEGIN) == 1 and proc.stdout in written


def test_a_million_joins_on_one_sale_outgrow_its_buckets() -> None:
    costs = capacity.read_costs(bench())
    p = capacity.plan(costs, peak_joins=1_000_000, storefront_rps=5_000, target=0.7)
    assert p.hot_sale_buckets == 129  # 90 cores of Redis / 0.7
    assert p.bottleneck == "one hot sale's 64 buckets"
    assert any("storefront not priced" in n for n in p.notes)
    assert any("129 buckets" in n for n in p.notes)


def test_what_is_missing_is_said(tmp_path: Path) -> None:
    no_accept = {"rows": [r for r in bench()["rows"] if not r["scenario"].startswith("3 ")]}
    with pytest.raises(capacity.CapacityError, match="3 accept path"):
        capacity.read_costs(no_accept)
    no_cpu = bench()
    no_cpu["rows"][1]["detail"] = {}
    with pytest.raises(capacity.CapacityError, match="no CPU µs per request of gateway"):
        capacity.read_costs(no_cpu)
    with pytest.raises(capacity.CapacityError, match="not found"):
        capacity.main(
            source=str(tmp_path / "absent.json"),
            peak_joins=1,
            storefront_rps=0,
            target=0.7,
            storefront_gateway_us=None,
            storefront_postgres_us=None,
            write=None,
        )


def test_capacity_md_is_the_commands_output(monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(repo)  # the page names its input as the command was given it
    text = capacity.main(
        source="docs/capacity-bench.json",
        peak_joins=100_000,
        storefront_rps=20_000,
        target=0.7,
        storefront_gateway_us=None,
        storefront_postgres_us=None,
        write=None,
    )
    assert text in (repo / "CAPACITY.md").read_text(encoding="utf-8"), (
        "regenerate: flashsale capacity --peak-joins 100000 --storefront-rps 20000 "
        "--from docs/capacity-bench.json --write CAPACITY.md"
    )


@pytest.mark.unit
def test_a_join_row_that_mentions_the_storefront_does_not_price_it() -> None:
    data = bench()
    data["rows"].append(
        {
            "scenario": "10a join, no storefront load",
            "detail": {"cpu_us": {"gateway": 229.7, "redis": 68.2}},
        }
    )
    costs = capacity.read_costs(data)
    assert costs.storefront_gateway is None and costs.storefront_postgres is None
