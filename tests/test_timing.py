"""The timing constants that must agree with each other, or with a file outside Python."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Final

import pytest

from flashsale import timing

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def test_a_machine_lease_survives_a_few_failed_renewals() -> None:
    assert timing.MACHINE_LEASE_RENEW_S * 1000 * 3 <= timing.MACHINE_LEASE_TTL_MS


def test_the_consumer_heartbeat_is_well_inside_composes_health_check() -> None:
    compose = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
    found = re.search(r"consumer\.heartbeat'; .*getmtime\(p\) < (\d+)", compose)
    assert found is not None, "docker-compose.yml no longer checks the consumer's heartbeat"
    assert int(found.group(1)) >= timing.CONSUMER_HEARTBEAT_S * 3


def test_backoffs_grow() -> None:
    for backoff in (timing.BATCH_RETRY_BACKOFF_S, timing.RESTART_BACKOFF_S):
        assert list(backoff) == sorted(backoff)


def test_the_dashboards_windows_lie_inside_the_seconds_a_snapshot_reads() -> None:
    """A snapshot reads the hashes of the last DASH_LATENCY_WINDOW_S seconds: the rate and
    gauge windows are taken from those, and each hash outlives every reader of it."""
    assert timing.DASH_RATE_WINDOW_S <= timing.DASH_LATENCY_WINDOW_S
    assert timing.DASH_GAUGE_FRESH_S <= timing.DASH_LATENCY_WINDOW_S
    assert timing.DASH_SECOND_TTL_S > timing.DASH_LATENCY_WINDOW_S + 1


def test_a_worker_that_lost_the_tick_gives_up_within_the_second() -> None:
    assert timing.DASH_READ_RETRY_S * timing.DASH_READ_RETRIES < 1.0
    assert timing.DASH_TICK_TTL_S > 1  # the key outlives the second it elects a writer for


def test_store_probes_never_pile_up() -> None:
    assert timing.STORE_PROBE_TIMEOUT_S <= timing.STORE_PROBE_EVERY_S


def test_the_adaptive_admission_rate_is_documented_as_it_is_measured() -> None:
    """docs/settings.md (FLASHSALE_QUEUE_ADMIT_PER_S) names the window and the floor."""
    from flashsale.settings import Settings, spec
    from flashsale.waitingroom.room import ADAPTIVE_FLOOR_PER_S

    doc = spec(Settings.__dataclass_fields__["queue_admit_per_s"]).doc
    assert f"last {timing.QUEUE_ACCEPT_RATE_WINDOW_S:g} s" in doc, doc
    assert f"at least {ADAPTIVE_FLOOR_PER_S:g}/s" in doc, doc


# Not periods of the code's own: a unit the settings' defaults are written in (settings imports
# nothing of the project, timing included), and the latency histogram's bucket bounds.
_NOT_TIMING: Final = {
    ("flashsale/settings.py", "DAY_S"),
    ("flashsale/stores/metrics.py", "LATENCY_BOUNDS_S"),
}


def test_timing_constants_are_declared_in_timing_py() -> None:
    """A module-level ``*_S`` / ``*_MS`` constant outside flashsale/timing.py is a period,
    timeout or lifetime declared a second way (a rate, ``*_PER_S``, is not one)."""
    found = []
    for package in ("flashsale", "gateway", "consumers", "stack"):
        for path in sorted((ROOT / package).rglob("*.py")):
            where = str(path.relative_to(ROOT))
            for node in ast.parse(path.read_text(encoding="utf-8")).body:
                targets = (
                    node.targets
                    if isinstance(node, ast.Assign)
                    else [node.target]
                    if isinstance(node, ast.AnnAssign)
                    else []
                )
                found += [
                    (where, t.id)
                    for t in targets
                    if isinstance(t, ast.Name)
                    and re.search(r"(?<!_PER)_M?S$", t.id)
                    and where != "flashsale/timing.py"
                    and (where, t.id) not in _NOT_TIMING
                ]
    assert found == []
