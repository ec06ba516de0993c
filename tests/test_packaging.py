"""What a wheel of regoptim holds: every package of the source tree, and the kernel sources.

``pip install .`` (not editable) installs only what pyproject.toml lists; a subpackage missing
from its explicit ``packages`` list imports from a checkout but not from a wheel.
"""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parent.parent
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _source_packages() -> set[str]:
    found = set()
    for pkg, where in CONFIG["package-dir"].items():
        base = ROOT / where
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            found.add(".".join((pkg, *rel.parts)) if rel.parts else pkg)
    return found


def test_every_package_is_listed():
    listed = set(CONFIG["packages"])
    assert _source_packages() <= listed, sorted(_source_packages() - listed)


def test_kernel_sources_are_package_data():
    pkg = "regoptim.backends.cpu"
    patterns = CONFIG["package-data"][pkg]
    base = ROOT / pkg.replace(".", "/")
    for f in (base / "csrc").iterdir():
        rel = f.relative_to(base).as_posix()
        assert any(Path(rel).match(p) for p in patterns), f"{rel} is not package data"
