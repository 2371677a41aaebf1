"""One error catalogue: every code comes from exactly one class in flashsale/errors.py."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

from flashsale import errors
from flashsale.errors import AppError

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("flashsale", "gateway", "consumers")


def _all_error_classes() -> list[type[AppError]]:
    for package in PACKAGES:
        for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)
    found: list[type[AppError]] = []
    todo = [AppError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return [c for c in found if c.__module__.split(".")[0] in PACKAGES]


def test_no_raise_site_passes_its_own_code() -> None:
    names = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, AppError)}
    bad = []
    for package in (*PACKAGES, "loadtests"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                if name in names and any(k.arg == "code" for k in node.keywords):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}(code=...)")
    assert bad == []


def test_every_error_class_lives_in_the_catalogue() -> None:
    elsewhere = [
        f"{c.__module__}.{c.__qualname__}"
        for c in _all_error_classes()
        if c.__module__ != "flashsale.errors"
    ]
    assert elsewhere == []


def test_each_code_comes_from_exactly_one_class() -> None:
    by_code: dict[str, list[str]] = {}
    for cls in _all_error_classes():
        by_code.setdefault(cls.code, []).append(cls.__qualname__)
    assert {code: names for code, names in by_code.items() if len(names) > 1} == {}
    assert all(code.isupper() and code.replace("_", "").isalpha() for code in by_code)


def _codes_written_out(tree: ast.AST, codes: set[str]) -> list[tuple[int, str]]:
    """Catalogue codes written as strings where an error is shaped: an envelope's
    ``"error"``, the code argument of the envelope builders, a table of codes."""
    found: list[tuple[int, str]] = []
    documented = set()  # a route's responses document codes (gateway/routing.py)
    tables = set()  # names of response tables shared by routes
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg == "responses":
                    documented |= {id(n) for n in ast.walk(kw.value)}
                    tables |= {n.id for n in ast.walk(kw.value) if isinstance(n, ast.Name)}
        if isinstance(node, ast.FunctionDef) and node.name == "_error_codes":
            documented |= {id(n) for n in ast.walk(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id in tables for t in node.targets
        ):
            documented |= {id(n) for n in ast.walk(node.value)}
    for node in ast.walk(tree):
        if id(node) in documented:
            continue
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                is_error_key = isinstance(key, ast.Constant) and key.value == "error"
                if is_error_key and isinstance(value, ast.Constant):
                    found.append((node.lineno, f'"error": {value.value!r}'))
            items = node.values
        elif isinstance(node, ast.Tuple | ast.List | ast.Set):
            items = node.elts
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name in ("_error_response", "envelope") and len(node.args) > 1:
                code = node.args[1]
                if isinstance(code, ast.Constant):
                    found.append((node.lineno, f"{name}(..., {code.value!r})"))
            continue
        else:
            continue
        table = [v.value for v in items if isinstance(v, ast.Constant) and v.value in codes]
        if len(table) > 1:
            found.append((node.lineno, f"a table of codes {table}"))
    return found


def test_no_code_is_written_out_beside_the_catalogue() -> None:
    """The codes of aiohttp's own errors, the readiness probe's and the consumer's are
    the catalogue's too: nothing outside flashsale/errors.py spells one out."""
    codes = {c.code for c in _all_error_classes()} | {"HTTP_ERROR", "NOT_READY"}
    bad = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "flashsale" / "errors.py":
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            bad += [
                f"{path.relative_to(ROOT)}:{n} {what}"
                for n, what in _codes_written_out(tree, codes)
            ]
    assert bad == []


@pytest.mark.parametrize("status", [400, 404, 405, 413, 415])
def test_the_frameworks_errors_map_to_classes_of_their_status(status: int) -> None:
    cls = errors.for_http_status(status)
    assert cls.http_status == status and cls.__module__ == "flashsale.errors"


def test_a_framework_error_with_no_class_is_an_http_error() -> None:
    assert errors.for_http_status(431) is errors.HttpError


def test_routes_name_their_errors_from_the_catalogue() -> None:
    """``Route.responses`` lists classes of flashsale/errors.py, and the document takes each
    one's status and code from it."""
    from gateway.routes import extra_routes, health, users
    from gateway.routes.payments import SANDBOX_ROUTES
    from gateway.routing import errors_of, openapi_spec

    routes = [*health.ROUTES, *users.ROUTES, *extra_routes(), *SANDBOX_ROUTES]
    catalogue = {v for v in vars(errors).values() if isinstance(v, type)}
    spec = openapi_spec(routes, version="test")
    for r in routes:
        for error in errors_of(r):
            assert error in catalogue and issubclass(error, AppError), (r.method, r.path, error)
            answer = spec["paths"][r.path][r.method.lower()]["responses"][str(error.http_status)]
            assert error.code in answer["description"].split(", "), (r.method, r.path, error)
