"""The waiting room without servers: its signed strings each verify only what they were
signed for, and the admission rate that follows the accept rate."""

from __future__ import annotations

from dataclasses import fields

import orjson
import pytest

from flashsale.errors import ValidationFailed
from flashsale.settings import Settings
from flashsale.waitingroom import signing
from flashsale.waitingroom.config import QueueConfig, settable
from flashsale.waitingroom.signing import Signer, Ticket, leading_zero_bits, proof_ok, solve
from gateway.routes.flashsales import QueueSettings, SalePatch
from gateway.shapes import decode_body

pytestmark = pytest.mark.unit

SECRET = "unit-test-secret-0123456789abcdef"


def test_a_ticket_reads_back_and_the_same_entry_signs_the_same() -> None:
    s = Signer(SECRET)
    t = Ticket(sale_id=7, user_id=42, kind="F", position=1001, entered_ms=1_700_000_000_123)
    signed = s.ticket(t)
    assert s.read_ticket(signed) == t
    assert s.ticket(t) == signed
    assert s.read_ticket(signed.replace(".42.", ".43.")) is None  # another user
    assert s.read_ticket(signed[:-1] + ("A" if signed[-1] != "A" else "B")) is None
    assert Signer(SECRET + "x").read_ticket(signed) is None
    assert s.read_ticket("garbage") is None and s.read_ticket("") is None
    assert s.read_ticket(signed) == t  # the checked ticket, remembered


def test_the_tickets_a_worker_remembers_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(signing, "TICKETS_KEPT", 10)
    s = Signer(SECRET)
    tickets = [Ticket(7, uid, "F", uid, 1_700_000_000_000) for uid in range(25)]
    for t in tickets:
        assert s.read_ticket(s.ticket(t)) == t
    assert len(s._tickets) <= 10
    assert [s.read_ticket(s.ticket(t)) for t in tickets] == tickets


def test_a_join_token_is_bound_to_user_and_sale() -> None:
    s = Signer(SECRET)
    token = s.join_token(7, 42, 1_700_000_060_000)
    assert s.join_token_expiry(token, 7, 42) == 1_700_000_060_000
    assert s.join_token_expiry(token, 7, 43) is None
    assert s.join_token_expiry(token, 8, 42) is None
    later = token.replace("1700000060000", "1700000960000")
    assert s.join_token_expiry(later, 7, 42) is None  # the expiry cannot be moved


def test_a_proof_of_work_is_checked_against_user_sale_age_and_difficulty() -> None:
    s = Signer(SECRET)
    now = 1_700_000_000_000
    challenge = s.challenge(7, 42, now, 8)
    answer = solve(challenge, 8)
    assert proof_ok(challenge, answer, 8)
    ok = {"sale_id": 7, "user_id": 42, "now_ms": now + 1000, "difficulty": 8}
    assert s.proof_valid(challenge, answer, **ok)
    assert not s.proof_valid(challenge, answer, **{**ok, "user_id": 43})
    assert not s.proof_valid(challenge, answer, **{**ok, "sale_id": 8})
    assert not s.proof_valid(challenge, answer, **{**ok, "now_ms": now + 301_000})
    assert not s.proof_valid(challenge, answer, **{**ok, "difficulty": 9})  # the sale raised it
    assert leading_zero_bits(b"\x00\x0f") == 12 and leading_zero_bits(b"\x80") == 0


def test_the_admission_rate_follows_the_accept_rate() -> None:
    from collections import deque

    from flashsale.waitingroom.room import ADAPTIVE_FLOOR_PER_S, follow_accept_rate

    samples: deque[tuple[float, int]] = deque(maxlen=64)
    assert follow_accept_rate(samples, 0.0, 0) == ADAPTIVE_FLOOR_PER_S  # nothing measured yet
    assert follow_accept_rate(samples, 1.0, 5) == ADAPTIVE_FLOOR_PER_S  # slow joins: the floor
    assert follow_accept_rate(samples, 2.0, 105) == 2 * 105 / 2  # 52.5 sold/s, admitted x2
    for t in range(3, 10):
        rate = follow_accept_rate(samples, float(t), 105)  # joins stopped
    assert rate == ADAPTIVE_FLOOR_PER_S  # the window moved past the burst


def test_the_queue_settings_are_declared_once_and_the_api_checks_each() -> None:
    """flashsale/waitingroom/config.py declares each setting a sale may give, with its
    bounds; the API's ``queue`` object is built from it, so neither can gain a setting
    the other lacks."""
    names = [f.name for f in fields(QueueConfig)]
    assert list(settable()) == names
    assert list(QueueSettings.__struct_fields__) == names
    for name, (kind, bounds) in settable().items():
        if bounds.max is None:
            continue
        too_big = kind(bounds.max) + 1
        with pytest.raises(ValidationFailed) as caught:
            decode_body(orjson.dumps({"queue": {name: too_big}}), SalePatch)
        assert caught.value.fields is not None and f"queue.{name}" in caught.value.fields


def test_a_sale_overrides_a_deployment_queue_setting_within_its_range() -> None:
    """The settings a sale may give over a ``FLASHSALE_QUEUE_*`` default take that
    variable's range and meaning, and its value when the sale gives none."""
    settings = Settings(queue_admit_per_s=7.0, queue_overbook=2.5, queue_join_window_s=42)
    cfg = QueueConfig.of({"join_window_s": 9}, settings)
    assert (cfg.admit_per_s, cfg.overbook, cfg.join_window_s) == (7.0, 2.5, 9)
    assert cfg.opens_before_s == settings.queue_opens_before_s
    kind, bounds = settable()["overbook"]
    assert (kind, bounds.min, bounds.max) == (float, 1.0, 10.0)
    assert bounds.doc is not None and "FLASHSALE_QUEUE_OVERBOOK" in bounds.doc
    with pytest.raises(ValidationFailed):
        decode_body(b'{"queue": {"overbook": 0.5}}', SalePatch)
