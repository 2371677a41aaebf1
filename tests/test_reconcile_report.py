"""What ``flashsale reconcile`` says of a sale being recounted after a Redis restart: not
drift (its counters are not the live ones yet), with an exit code of its own."""

from __future__ import annotations

import pytest

from consumers.reconcile import DRIFT_EXIT, RECOVERING_EXIT, SaleReport, verdict

pytestmark = pytest.mark.unit


def _report(
    sale_id: int, *, armed: bool = True, remaining: int = 7, oversold: int = 0
) -> SaleReport:
    # 10 units: 7 remaining + 3 live orders (a fenced sale's counters may say anything)
    return SaleReport(
        sale_id=sale_id,
        quantity=10,
        remaining=remaining,
        in_log=0,
        claimed=0,
        live=3,
        pending_return=0,
        moved_out=0,
        oversold=oversold,
        armed=armed,
    )


def test_a_fenced_sale_is_recovering_not_drift() -> None:
    report = _report(1, armed=False, remaining=0)  # counters of the lost run: off by 7
    assert report.recovering and not report.ok
    assert report.line().startswith("sale 1: RECOVERING ")
    assert "the recovery recounts it within seconds" in report.line()
    assert verdict([report, _report(2)]) == (
        RECOVERING_EXIT,
        "2 sale(s) checked, 0 with drift, 1 recovering (run it again in a few seconds)",
    )


def test_drift_wins_over_recovering() -> None:
    drifting = _report(3, remaining=6)
    assert drifting.line().startswith("sale 3: DRIFT ")
    assert verdict([drifting, _report(4, armed=False)]) == (
        DRIFT_EXIT,
        "2 sale(s) checked, 1 with drift, 1 recovering (run it again in a few seconds)",
    )
    oversold = _report(5, armed=False, oversold=1)  # never hidden behind "recovering"
    assert not oversold.recovering and oversold.line().startswith("sale 5: DRIFT ")
    assert verdict([_report(6)]) == (0, "1 sale(s) checked, 0 with drift")
