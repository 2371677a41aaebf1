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


def test_the_http_package_imports_no_stack_code() -> None:
    """``gateway/`` is the web app only; the CLI, supervision and embedded servers sit above."""
    assert [(f, m) for f, m in _imports("gateway") if _under(m, "stack", "loadtests")] == []


def test_consumers_and_core_import_no_stack_code() -> None:
    for package in ("flashsale", "consumers"):
        assert [(f, m) for f, m in _imports(package) if _under(m, "stack", "loadtests")] == []


def test_load_tests_reach_the_stack_only_through_its_interface() -> None:
    """Not through the gateway's modules, and of the stack only the names ``stack.__all__``
    lists and the stack file, never a module's own name (``stack.embedded.free_port``)."""
    import stack

    allowed = {f"stack.{name}" for name in (*stack.__all__, "stackfile")}
    imports = _imports("loadtests")
    assert [(f, m) for f, m in imports if _under(m, "gateway")] == []
    assert [(f, m) for f, m in imports if _under(m, "stack") and m not in allowed] == []


def test_the_stacks_interface_is_what_its_type_checked_imports_say() -> None:
    """Each name ``stack.__all__`` lists is imported for mypy (``if TYPE_CHECKING``) from
    the module that defines it, and at run time resolves to that very object."""
    import importlib

    import stack

    tree = ast.parse((ROOT / "stack" / "__init__.py").read_text(encoding="utf-8"))
    typed = {
        alias.asname or alias.name: (node.module, alias.name)
        for block in tree.body
        if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
        for node in block.body
        if isinstance(node, ast.ImportFrom) and node.module
        for alias in node.names
    }
    assert sorted(typed) == stack.__all__
    for name, (module, original) in typed.items():
        assert getattr(stack, name) is getattr(importlib.import_module(module), original)


def test_the_stack_does_not_import_the_load_tests() -> None:
    assert [(f, m) for f, m in _imports("stack") if _under(m, "loadtests")] == []


def test_load_tests_use_no_private_name_of_the_project() -> None:
    bad = [
        (f, m)
        for f, m in _imports("loadtests")
        if "._" in m and _under(m, "flashsale", "consumers")
    ]
    assert bad == []


def test_stores_import_no_domain_module() -> None:
    """``flashsale/stores/`` reaches Redis, Kafka and PostgreSQL; the domain sits above it.
    Settings and the timing constants are below both: they import nothing of the project."""
    allowed = ("flashsale.stores", "flashsale.settings", "flashsale.timing")
    bad = [
        (f, m)
        for f, m in _imports("flashsale/stores")
        if _under(m, "flashsale") and not _under(m, *allowed)
    ]
    assert bad == []


def test_the_core_builds_no_http_path() -> None:
    """URLs are the HTTP layer's: the core hands out ids and tokens, ``gateway/`` the paths."""
    found = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "flashsale").rglob("*"))
        if path.is_file() and path.suffix != ".pyc" and b"/api/" in path.read_bytes()
    ]
    assert found == []


def test_redis_key_names_are_built_in_rediskeys() -> None:
    """A string the code starts with ``fs:`` is a Redis key name built a second way:
    flashsale/stores/rediskeys.py builds every one (a comment or docstring may name one)."""
    found = []
    for package in ("flashsale", "gateway", "consumers", "stack", "loadtests"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "flashsale" / "stores" / "rediskeys.py":
                continue
            found += [
                f"{path.relative_to(ROOT)}:{node.lineno}"
                for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                # an f-string's text parts are constants too
                if isinstance(node, ast.Constant) and str(node.value).startswith("fs:")
            ]
    assert found == []


def test_auth_imports_no_domain_module() -> None:
    """Tokens and roles sit beside the stores: the revocation list they read is a Protocol
    that ``flashsale.sessions`` satisfies, not an import of it."""
    allowed = ("flashsale.errors", "flashsale.settings", "flashsale.stores")
    found = [m for f, m in _imports("flashsale") if f == "flashsale/auth.py"]
    assert [m for m in found if _under(m, "flashsale") and not _under(m, *allowed)] == []


def test_tests_import_helpers_from_helper_modules() -> None:
    """A helper two test files share lives in a helper module (``flashkit``,
    ``store_helpers``, ``faultkit``, ``dockerkit``, ``conftest``), never in a test file."""
    found = [(f, m) for f, m in _imports("tests") if m.startswith("tests.test_")]
    assert found == []


def test_settings_and_timing_import_nothing_of_the_project() -> None:
    """Every layer may read them, so they stand on nothing."""
    bad = [
        (f, m)
        for f, m in _imports("flashsale")
        if f.endswith(("flashsale/settings.py", "flashsale/timing.py"))
        and _under(m, "flashsale", "gateway", "consumers", "stack", "loadtests")
    ]
    assert bad == []
