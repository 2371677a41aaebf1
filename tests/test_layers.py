"""The layers point one way: gateway/ and consumers/ import the core (flashsale/), never back."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


def _imports(package: str) -> list[tuple[str, str]]:
    """(file, imported module) for every import statement under ``package``."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found += [(str(path.relative_to(ROOT)), alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found += [
                    (str(path.relative_to(ROOT)), f"{node.module}.{alias.name}")
                    for alias in node.names
                ]
    return found


def _under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_core_imports_neither_gateway_nor_consumers_nor_aiohttp_web() -> None:
    bad = [
        (f, m) for f, m in _imports("flashsale") if _under(m, "gateway", "consumers", "aiohttp.web")
    ]
    assert bad == []


def test_consumers_do_not_import_the_gateway() -> None:
    assert [(f, m) for f, m in _imports("consumers") if _under(m, "gateway")] == []
