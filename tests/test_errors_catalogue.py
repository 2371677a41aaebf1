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
