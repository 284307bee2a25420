"""The layering rules of the README's architecture section, checked on the source: `protocol/` and
`crypto/` are pure (no Twisted, no SQLAlchemy, no I/O frameworks), and clients never import the
server."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Third-party top-level modules each layer may import (the standard library is always allowed).
ALLOWED_THIRD_PARTY = {
    "protocol": {"cbor2"},
    "crypto": {"nacl", "argon2"},
}
FORBIDDEN_PROJECT = {
    "protocol": {"medrelay.server", "medrelay.clients", "medrelay.crypto"},
    "crypto": {"medrelay.server", "medrelay.clients", "medrelay.protocol"},
    "clients": {"medrelay.server"},
}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _sources(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", sorted(ALLOWED_THIRD_PARTY))
def test_pure_layers_import_only_their_allowed_libraries(folder: str) -> None:
    """protocol/ may use stdlib and cbor2; crypto/ stdlib, PyNaCl and argon2-cffi."""
    allowed = ALLOWED_THIRD_PARTY[folder] | set(sys.stdlib_module_names) | {"medrelay"}
    offenders = [
        f"{path.relative_to(REPO)}: {name}"
        for path in _sources(folder)
        for name in _imports(path)
        if name.split(".")[0] not in allowed
    ]
    assert offenders == []


@pytest.mark.parametrize("folder", sorted(FORBIDDEN_PROJECT))
def test_layers_do_not_import_upwards(folder: str) -> None:
    """protocol and crypto know nothing of each other or of server/clients; clients never import
    the server."""
    forbidden = FORBIDDEN_PROJECT[folder]
    offenders = [
        f"{path.relative_to(REPO)}: {name}"
        for path in _sources(folder)
        for name in _imports(path)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]
    assert offenders == []


def test_no_module_imports_the_global_reactor() -> None:
    """The reactor is always an argument (Twisted #4860): no module-level reactor import."""
    offenders: list[str] = []
    for folder in ("server", "protocol", "crypto", "clients"):
        for path in _sources(folder):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in tree.body:
                if (
                    isinstance(node, ast.ImportFrom)
                    and node.module == "twisted.internet"
                    and any(alias.name == "reactor" for alias in node.names)
                ):
                    offenders.append(str(path.relative_to(REPO)))
    assert offenders == []
