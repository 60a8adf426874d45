"""What pip installs: one version, and a declared dependency for every library cuebx imports."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

import cuebx

ROOT = Path(__file__).parents[2]
PACKAGE = ROOT / "cuebx"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Modules that import a library cuebx does not depend on, and why that is right.
LOADED_ONLY_BY = {
    # Loaded through the pytest11 entry point, i.e. only by a running pytest.
    ("pytest_plugin.py", "pytest"): "pytest",
}

# Store backends, imported only by `store_for_url` for their URL scheme (which names the
# extra when it is missing): what they import must be in that extra.
LOADED_BY_SCHEME = {"stores/redis.py": "redis", "stores/postgres.py": "postgres"}


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement such as ``aio-pika>=10.2``."""
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group()).lower()


@functools.cache
def _distributions() -> Mapping[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _distribution(module: str) -> set[str]:
    """The normalised names of the installed distributions that provide top-level `module`.

    A namespace package has several (``opentelemetry``: the API, the SDK, ...).
    """
    found = _distributions().get(module)
    assert found, f"no installed distribution provides {module!r}"
    return {_name(name) for name in found}


def _guarded(node: ast.Try) -> bool:
    """Whether a try statement catches ImportError (an optional import)."""
    names = {"ImportError", "ModuleNotFoundError"}
    for handler in node.handlers:
        caught = handler.type
        kinds = caught.elts if isinstance(caught, ast.Tuple) else [caught]
        if any(isinstance(k, ast.Name) and k.id in names for k in kinds):
            return True
    return False


def _imports(tree: ast.AST, optional: bool = False) -> Iterator[tuple[str, bool]]:
    """Top-level names of absolute imports in `tree`, each with whether it is optional."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.partition(".")[0], optional
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.partition(".")[0], optional
        else:
            inner = optional or (isinstance(node, ast.Try) and _guarded(node))
            yield from _imports(node, inner)


def _third_party() -> dict[tuple[str, str], bool]:
    """(file, top-level module) -> optional, for every import outside the stdlib and cuebx."""
    found: dict[tuple[str, str], bool] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for module, optional in _imports(ast.parse(path.read_text(), str(path))):
            if module in sys.stdlib_module_names or module == "cuebx":
                continue
            key = (str(path.relative_to(PACKAGE)), module)
            found[key] = found.get(key, True) and optional
    return found


def test_the_import_scan_finds_the_libraries_cuebx_is_known_to_use() -> None:
    modules = {module for _, module in _third_party()}
    assert {"aio_pika", "aiormq", "pamqp", "anyio", "msgspec", "click", "uvloop"} <= modules


def test_every_library_cuebx_imports_is_a_declared_dependency() -> None:
    required = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    extras = {
        _name(r)
        for name, requirements in PYPROJECT["project"]["optional-dependencies"].items()
        if name != "dev"
        for r in requirements
    }
    undeclared = []
    for (path, module), optional in _third_party().items():
        if (path, module) in LOADED_ONLY_BY:
            continue
        declared = required | extras if optional else required
        if path in LOADED_BY_SCHEME:
            extra = PYPROJECT["project"]["optional-dependencies"][LOADED_BY_SCHEME[path]]
            declared = required | {_name(r) for r in extra}
        if not _distribution(module) & declared:
            undeclared.append(f"{path}: {module} ({'optional' if optional else 'required'})")
    assert undeclared == []


@pytest.mark.parametrize(("path", "module"), sorted(LOADED_ONLY_BY))
def test_the_known_exceptions_still_import_what_they_are_excused_for(
    path: str, module: str
) -> None:
    assert (path, module) in _third_party()


def test_the_version_has_one_source_cuebx_init() -> None:
    assert "version" not in PYPROJECT["project"]
    assert "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["hatch"]["version"]["path"] == "cuebx/__init__.py"


def test_the_installed_metadata_has_cuebx_s_version() -> None:
    # scripts/bootstrap reinstalls when __version__ changes, so this holds in the test command.
    assert importlib.metadata.version("cuebx") == cuebx.__version__


def test_the_license_file_is_the_complete_mit_text() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 cuebx developers\n")
    assert "Permission is hereby granted, free of charge" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in text
    assert PYPROJECT["project"]["license"] == "MIT"
