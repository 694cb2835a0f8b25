"""No module of ours may shadow a standard-library or an installed distribution's top-level module.

Prefect puts an entrypoint file's folder on ``sys.path`` (a file-path entrypoint did: ``flows/inspect.py``
then replaced the standard ``inspect`` in every Dask worker). Our folders are mapped to ``copgen.*``, but a
script, a notebook or a tool run from inside one of them sees the bare names, so none may collide."""

from __future__ import annotations

import sys
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ("copgen_core", "storage", "flows")  # the package-dir mapping in pyproject.toml


def _our_module_names() -> dict[str, Path]:
    names = {folder: REPO / folder for folder in FOLDERS}  # bare names when the checkout is on sys.path
    for folder in FOLDERS:
        for path in (REPO / folder).rglob("*"):
            if "__pycache__" in path.parts:
                continue
            if path.suffix == ".py" and path.stem != "__init__":
                names[path.stem] = path
            elif path.is_dir() and (path / "__init__.py").exists():
                names[path.name] = path
    return names


def test_the_walk_finds_our_modules():
    names = _our_module_names()
    assert {"complete", "deploy", "cube_inspect", "cubes", "majortom"} <= set(names)


def test_no_module_shadows_the_standard_library():
    clashes = {n: str(p.relative_to(REPO)) for n, p in _our_module_names().items()
               if n in sys.stdlib_module_names}
    assert not clashes, f"modules named like standard-library modules: {clashes}"


def test_no_module_shadows_an_installed_distribution():
    installed = {name for name, dists in packages_distributions().items() if "copgen" not in dists}
    clashes = {n: str(p.relative_to(REPO)) for n, p in _our_module_names().items() if n in installed}
    assert not clashes, f"modules named like installed top-level modules: {clashes}"
