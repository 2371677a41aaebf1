"""One page of a list: the rows it skips, and the answer every list gives."""

from __future__ import annotations

from typing import Any


def offset(page: int, limit: int) -> int:
    """The rows before page ``page`` (counted from 1) of ``limit`` rows: the SQL OFFSET."""
    return (page - 1) * limit


def page_of(
    name: str, items: list[Any], *, total: int, page: int, limit: int, **more: Any
) -> dict[str, Any]:
    """A list's answer: this page's ``items`` under ``name``, how many match in all, which
    page and how long; ``more`` (the sort) after them."""
    return {name: items, "total": total, "page": page, "limit": limit, **more}
