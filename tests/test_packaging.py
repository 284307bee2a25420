"""Guards for the package-dir layout: the folders `server/ protocol/ crypto/ clients/` are the
import namespace `medrelay`, only `medrelay/` lands in a wheel, and the bare folder names are never
importable (that would load the same files twice under two names)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


def _pyproject() -> dict[str, Any]:
    with (REPO / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def _mapping() -> dict[str, str]:
    mapping: dict[str, str] = _pyproject()["tool"]["setuptools"]["package-dir"]
    return mapping


def _packages_from_folders() -> set[str]:
    found: set[str] = set()
    for dotted, folder in _mapping().items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            relative = init.parent.relative_to(root)
            found.add(".".join([dotted, *relative.parts]))
    return found


def test_declared_packages_match_folders() -> None:
    """Every folder with an __init__.py is listed in pyproject, and nothing else is."""
    declared = set(_pyproject()["tool"]["setuptools"]["packages"])
    assert declared == _packages_from_folders()


def test_every_package_is_typed() -> None:
    """mypy only sees a mapped package that ships py.typed."""
    for folder in _mapping().values():
        for init in (REPO / folder).rglob("__init__.py"):
            assert (init.parent / "py.typed").exists() or init.parent != REPO / folder, init
    for folder in _mapping().values():
        assert (REPO / folder / "py.typed").exists(), folder


@pytest.mark.parametrize("name", ["server", "crypto", "protocol", "clients"])
def test_bare_folder_names_are_not_importable(name: str) -> None:
    """`import server` must fail: run tests with the pytest entry point, not `python -m pytest`."""
    assert importlib.util.find_spec(name) is None


@pytest.mark.slow
def test_wheel_holds_exactly_the_mapped_packages(tmp_path: Path) -> None:
    """A real wheel build contains medrelay/<package>/... for every folder, and nothing else."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in _mapping().values():
        shutil.copytree(
            REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    out = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(source),
        ],
        check=True,
    )
    (wheel,) = out.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"medrelay"}
    in_wheel = {n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert in_wheel == _packages_from_folders()
    assert all(f"{package.replace('.', '/')}/py.typed" in names for package in in_wheel)
