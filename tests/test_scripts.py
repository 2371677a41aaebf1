"""Each Lua script's header lists its result codes; the IntEnum in flashsale/stores/scripts.py
naming them must say the same (code and member name)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from flashsale.stores import scripts

pytestmark = pytest.mark.unit

LUA = Path(__file__).resolve().parent.parent / "lua"
RETURNS = re.compile(r"^-- Returns \(flashsale/stores/scripts\.py (\w+)\)")
CODE = re.compile(r"^--\s+(-?\d+) ([A-Z][A-Z_]*)\b")


def header_codes(text: str) -> tuple[str, dict[int, str]]:
    """(enum name, {code: member name}) from a script's ``-- Returns (...)`` block: the
    lines after it that start with ``--`` and two spaces, code lines among them."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        found = RETURNS.match(line)
        if found is None:
            continue
        codes: dict[int, str] = {}
        for entry in lines[i + 1 :]:
            if not entry.startswith("--  "):
                break
            code = CODE.match(entry)
            if code is not None:
                assert int(code.group(1)) not in codes, entry
                codes[int(code.group(1))] = code.group(2)
        return found.group(1), codes
    raise AssertionError("no '-- Returns (flashsale/stores/scripts.py <Enum>)' line")


def test_every_script_names_its_enum() -> None:
    names = sorted(p.stem for p in LUA.glob("*.lua"))
    assert names == sorted(scripts.RESULTS)
    for name in names:
        enum_name, _ = header_codes((LUA / f"{name}.lua").read_text(encoding="utf-8"))
        assert getattr(scripts, enum_name) is scripts.RESULTS[name], name


@pytest.mark.parametrize("name", sorted(scripts.RESULTS))
def test_header_codes_equal_the_enum(name: str) -> None:
    _, codes = header_codes((LUA / f"{name}.lua").read_text(encoding="utf-8"))
    enum = scripts.RESULTS[name]
    assert codes == {member.value: member.name for member in enum}


def test_the_parser_reads_continuations_and_stops_at_code() -> None:
    text = (
        "-- Returns (flashsale/stores/scripts.py X) {status}:\n"
        "--  -1 GONE: a long\n"
        "--     explanation 7 NOT_A_CODE\n"
        "--   2 KEPT\n"
        "return 1\n"
        "--   3 AFTER\n"
    )
    assert header_codes(text) == ("X", {-1: "GONE", 2: "KEPT"})


def test_reserve_codes_index_their_members() -> None:
    """parse_reserve reads the status by index (the join path's cost): codes are 0..n."""
    assert [member.value for member in scripts.Reserve] == list(range(len(scripts.Reserve)))


@pytest.mark.parametrize(
    ("reply", "named"),
    [
        ([0, b"o-new", b"1700000900000", b"41"], ("RESERVED", "", 1700000900000, 41, 0)),
        ([1, b"o-old", b"1700000900000"], ("REPLAY", "o-old", 1700000900000, 0, 0)),
        ([3, 250], ("USER_RATE_LIMITED", "", 0, 0, 250)),
        ([4, 80], ("IP_RATE_LIMITED", "", 0, 0, 80)),
        ([7, b"o-first"], ("LIMIT_EXCEEDED", "o-first", 0, 0, 0)),
        ([7, b""], ("LIMIT_EXCEEDED", "", 0, 0, 0)),
        ([9, 3], ("INSUFFICIENT", "", 0, 3, 0)),
        ([8], ("SOLD_OUT", "", 0, 0, 0)),
        ([11], ("RECOVERING", "", 0, 0, 0)),
    ],
)
def test_a_reserve_reply_is_read_by_name(reply: list[object], named: tuple[object, ...]) -> None:
    res = scripts.parse_reserve(reply)
    assert isinstance(res, scripts.ReserveResult)
    assert (res.status.name, res.order_id, res.deadline_ms, res.remaining, res.retry_ms) == named


def test_reserve_args_follow_the_scripts_argv() -> None:
    """lua/reserve.lua's header numbers its ARGV; reserve_args takes them in that order."""
    header: dict[int, str] = {}
    for line in (LUA / "reserve.lua").read_text(encoding="utf-8").splitlines():
        if line.startswith("--"):
            for n, name in re.findall(r"ARGV\[(\d)\] ([a-z]+(?: [a-z/]+)?)", line):
                header.setdefault(int(n), name.strip())
    said = {
        "user_id": "user id",
        "quantity": "quantity",
        "order_id": "order id",
        "idem_field": "idempotency field",
        "fingerprint": "body fingerprint",
        "user_rate_per_s": "user rate/s",
        "user_burst": "user burst",
        "ip_rate_per_s": "ip rate/s",
        "ip_burst": "ip burst",
    }
    params = list(inspect.signature(scripts.reserve_args).parameters)
    assert [said[p] for p in params] == [header[i] for i in range(1, len(params) + 1)]
    assert scripts.reserve_args(*range(9)) == list(range(9))


def test_the_other_replies_are_read_by_name() -> None:
    give = scripts.parse_give([0, 5, b"t-1"])
    assert (give.status, give.units, give.transfer) == (scripts.Give.GIVEN, 5, "t-1")
    assert scripts.parse_give([3, 7]).moves == 7
    entered = scripts.parse_queue_enter([1, b"F", 1001, 1700000000123])
    assert (entered.status, entered.kind, entered.position, entered.entered_ms) == (
        scripts.QueueEnter.ALREADY_IN,
        "F",
        1001,
        1700000000123,
    )
    assert scripts.parse_queue_enter([5, b"1700000000000"]).opens_ms == 1700000000000
    admitted = scripts.parse_queue_admit([0, 3, 2, 10, 4, 50, b"1500", b"20"])
    assert (admitted.ran, admitted.abandoned, admitted.waits_ms) == (True, 2, (1500, 20))
    assert scripts.parse_queue_admit([1, 3, 0, 10, 4, 50]).waits_ms == ()
    assert not scripts.parse_queue_admit([6]).ran
    assert scripts.parse_sale_load([-1]) == (True, 0)
    assert scripts.parse_sale_load([40, 100]) == (False, 40)
