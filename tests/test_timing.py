"""The timing constants that must agree with each other, or with a file outside Python."""

from __future__ import annotations

import re
from pathlib import Path

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
