"""RELIABILITY.md names a test for each claim: every one it names exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = re.compile(r"`(test_\w+\.py)::(test_\w+)`")


def test_every_test_reliability_md_names_exists() -> None:
    text = (ROOT / "RELIABILITY.md").read_text()
    named = REFERENCE.findall(text)
    assert len(named) >= 20  # the contract is backed by tests, not prose
    missing = []
    for file, name in named:
        tree = ast.parse((ROOT / "tests" / file).read_text())
        defined = {
            n.name for n in ast.walk(tree) if isinstance(n, ast.AsyncFunctionDef | ast.FunctionDef)
        }
        if name not in defined:
            missing.append(f"{file}::{name}")
    assert not missing, f"RELIABILITY.md names tests that do not exist: {missing}"
