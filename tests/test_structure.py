"""The shape of the code base: what a new maintainer relies on when changing it.

- no import circle among product modules (a child never imports its parent);
- no product module over 500 lines, no function body over 60 lines (metric
  tables excepted: a registry's declarations read best as one list);
- every exception class is defined in ``broker/_errors.py``;
- the README's table of error codes is the tree's, code for code.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker._errors import ERROR_CODES

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("broker", "workers", "gateway", "devstack", "cli", "bench")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def _module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the product packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts).removesuffix(".__init__")
            out[name] = path
    return out


MODULES = _module_files()


def _imports(name: str, path: Path) -> set[str]:
    """The product modules ``name`` imports (TYPE_CHECKING imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            candidates = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c in MODULES and c != name}
    # Importing a module runs its package's __init__; that edge is not a circle.
    return found - {package}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the list of modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle_among_product_modules() -> None:
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{name} has {lines} lines"


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the end (not the signature:
    a typer command's options are its signature)."""
    body = fn.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    assert fn.end_lineno is not None
    return fn.end_lineno - body[0].lineno + 1


@pytest.mark.parametrize("name", sorted(MODULES))
def test_function_size(name: str) -> None:
    if name.endswith("._metrics"):
        return  # metric declarations: one table, read top to bottom
    tree = ast.parse(MODULES[name].read_text())
    sizes = {f"{fn.name} (line {fn.lineno})": _body_lines(fn) for fn in _functions(tree)}
    too_long = {where: n for where, n in sizes.items() if n > MAX_FUNCTION_LINES}
    assert not too_long, f"{name}: {too_long}"


def _product_modules() -> Iterator[object]:
    for package in PACKAGES:
        root = importlib.import_module(package)
        yield root
        for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
            yield importlib.import_module(info.name)


def test_every_exception_class_is_defined_in_the_error_tree() -> None:
    elsewhere = []
    for module in _product_modules():
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == getattr(module, "__name__", "")
                and value.__module__ != "broker._errors"
            ):
                elsewhere.append(f"{value.__module__}.{name}")
    assert not elsewhere


def _readme_codes() -> dict[str, tuple[str, bool, int]]:
    text = (REPO / "README.md").read_text()
    section = text.split("### Error codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| (\d+) \| (yes|no) \| (.+?) \|$", section, re.M)
    return {code: (desc, retry == "yes", int(status)) for code, status, retry, desc in rows}


def test_readme_error_table_is_the_tree() -> None:
    assert _readme_codes() == ERROR_CODES
    assert list(_readme_codes()) == list(ERROR_CODES)  # same order too


def _readme_layout() -> set[str]:
    """Module paths named in the README's layout tree (``pkg/`` lines, then ``  _mod.py``)."""
    text = (REPO / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    listed, folder = set(), ""
    for line in block.splitlines():
        if m := re.match(r"^(\S+/)\s", line + " "):
            folder = m.group(1)
        elif m := re.match(r"^\s+(\S+\.py)\s", line + " "):
            listed.add(folder + m.group(1))
    return listed


def test_readme_layout_names_every_module() -> None:
    modules = {str(path.relative_to(REPO)) for path in MODULES.values()}
    listed = _readme_layout()
    assert not modules - listed, "missing from the README's layout"
    assert not listed - modules, "in the README's layout, but not in the code"
