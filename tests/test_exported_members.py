"""Every package's public names are exactly its ``__all__`` (as httpx checks its own).

A name a package shows but does not list is an accident waiting to be relied
on; a listed name that is missing breaks ``from package import *``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest

PACKAGES = [
    "broker",
    "workers",
    "workers.providers",
    "gateway",
    "devstack",
    "devstack.fake_provider",
    "cli",
    "bench",
]


def _public(package: ModuleType) -> set[str]:
    return {
        name
        for name, value in vars(package).items()
        if not name.startswith("_")
        and not isinstance(value, ModuleType)
        and name != "annotations"  # from __future__ import annotations
    }


@pytest.mark.parametrize("name", PACKAGES)
def test_all_public_members_are_exported(name: str) -> None:
    package = importlib.import_module(name)
    exported = list(getattr(package, "__all__", None) or [])
    assert len(exported) == len(set(exported)), f"{name}.__all__ lists a name twice"
    assert set(exported) == _public(package)


@pytest.mark.parametrize("name", PACKAGES)
def test_every_exported_name_exists(name: str) -> None:
    package = importlib.import_module(name)
    missing = [member for member in package.__all__ if not hasattr(package, member)]
    assert not missing
