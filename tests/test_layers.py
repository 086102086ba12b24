"""Imports point down the layers only (docs/design.md#layers).

Every module under ``src/raflora`` is parsed with :mod:`ast`; every import of a ``raflora`` module
— at module level or inside a function — must name a layer at or below the importing module's
own. Imports under ``if TYPE_CHECKING:`` are exempt (annotations only, nothing runs).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "raflora"

LAYERS: dict[str, int] = {
    "_muted_logs": 1,
    "linalg": 1,
    "schema": 1,
    "config": 1,
    "privacy": 1,  # pure clipping, noise and accounting code: imports no other layer
    "methods": 2,
    "aggregators": 2,  # the 0.1 alias of methods (re-exports it)
    "diagnostics": 3,
    "theory": 3,
    "data": 4,
    "tasks": 4,
    "adapters": 5,
    "report": 6,
    "engine": 7,
    "flower": 8,
    "experiments": 9,
    "api": 10,
    "cli": 10,
    "__init__": 10,
}
"""Top-level module or package → its layer, lowest first; a layer may import its own."""

KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {
    # config/ (layer 1) parses each method's and task's options and checks a partition name
    # while validating a run config: it imports the registries above it, inside the functions
    # that validate. Until the options move below config (or config above them) these stand
    # here, named, so that no new upward import can hide among them.
    ("config", "methods"): "method options and the method registry (checks, reference)",
    ("config", "tasks"): "task options and the task registry (reference: raflora config)",
    ("config", "data"): "partition names (checks)",
}
"""``(importing layer, imported layer)`` → why it is allowed for now."""


def _layer_name(path: Path) -> str:
    """``linalg`` for ``linalg.py``, ``engine`` for ``engine/federation.py``."""
    parts = path.relative_to(PACKAGE).parts
    return parts[0].removesuffix(".py") if len(parts) == 1 else parts[0]


def _module_parts(path: Path) -> tuple[list[str], bool]:
    """The dotted name of ``path`` as parts, and whether it is a package's ``__init__``."""
    parts = ["raflora", *path.relative_to(PACKAGE).with_suffix("").parts]
    is_package = parts[-1] == "__init__"
    return (parts[:-1] if is_package else parts), is_package


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """Ids of the nodes under ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            for child in node.body:
                inside.update(id(n) for n in ast.walk(child))
    return inside


def _target(name: str) -> str:
    """The layer an absolute ``raflora…`` module name belongs to."""
    parts = name.split(".")
    if len(parts) == 1:
        return "__init__"
    top = parts[1]
    if (PACKAGE / top).is_dir() or (PACKAGE / f"{top}.py").is_file():
        return top
    return "__init__"  # ``from raflora import aggregate``: a name of the package root


def imports(path: Path, source: str | None = None) -> Iterator[tuple[int, str, str]]:
    """``(line, imported module, its layer)`` for every ``raflora`` import of ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8") if source is None else source)
    exempt = _type_checking_nodes(tree)
    own, is_package = _module_parts(path)
    for node in ast.walk(tree):
        if id(node) in exempt:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package holding this module
                base = own if is_package else own[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if module == "raflora":  # from raflora import engine / from raflora import aggregate
                names = [f"raflora.{alias.name}" for alias in node.names]
            else:
                names = [module]
        for name in names:
            if name == "raflora" or name.startswith("raflora."):
                yield node.lineno, name, _target(name)


def upward_imports() -> list[tuple[str, str, int, str, str]]:
    """``(layer, file, line, module, its layer)`` for every import above the importing layer."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = _layer_name(path)
        for line, name, target in imports(path):
            if LAYERS[target] > LAYERS[layer]:
                found.append((layer, path.relative_to(PACKAGE).as_posix(), line, name, target))
    return found


def test_every_module_has_a_layer() -> None:
    tops = {_layer_name(p) for p in PACKAGE.rglob("*.py")}
    assert tops - LAYERS.keys() == set(), "add the new module or package to LAYERS"


def test_imports_point_down_the_layers() -> None:
    upward = [
        f"{file}:{line} imports {name} (layer {LAYERS[target]} {target})"
        for layer, file, line, name, target in upward_imports()
        if (layer, target) not in KNOWN_EXCEPTIONS
    ]
    assert upward == [], "\n".join(upward)


def test_every_known_exception_is_still_needed() -> None:
    used = {(layer, target) for layer, _, _, _, target in upward_imports()}
    stale = sorted(set(KNOWN_EXCEPTIONS) - used)
    assert stale == [], f"no longer imported upward, remove from KNOWN_EXCEPTIONS: {stale}"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from raflora.engine import run_local", [(1, "raflora.engine", "engine")]),
        ("def f():\n    import raflora.flower.app", [(2, "raflora.flower.app", "flower")]),
        ("from .. import engine", [(1, "raflora.engine", "engine")]),
        ("from ..cli import main", [(1, "raflora.cli", "cli")]),
        ("from . import plots", [(1, "raflora.report", "report")]),
        (
            "from raflora import aggregate, theory",
            [(1, "raflora.aggregate", "__init__"), (1, "raflora.theory", "theory")],
        ),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from raflora.engine import x",
            [],
        ),
        ("import numpy", []),
    ],
)
def test_imports_are_read_in_every_form(source: str, expected: list[tuple[int, str, str]]) -> None:
    """Absolute, relative, in a function, from the package root; TYPE_CHECKING exempt."""
    assert list(imports(PACKAGE / "report" / "metrics.py", source)) == expected


def test_every_source_folder_is_a_package() -> None:
    """A folder without ``__init__.py`` is left out of a regular (non-editable) install."""
    from setuptools import find_packages

    src = Path(__file__).resolve().parents[1] / "src"
    folders = {
        ".".join(p.relative_to(src).parts)
        for p in (src / "raflora").rglob("*")
        if p.is_dir() and any(p.glob("*.py")) and "__pycache__" not in p.parts
    }
    assert folders <= set(find_packages(str(src))), folders - set(find_packages(str(src)))
