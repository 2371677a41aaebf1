"""Each Lua script's header lists its result codes; the IntEnum in flashsale/stores/scripts.py
naming them must say the same (code and member name)."""

from __future__ import annotations

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
